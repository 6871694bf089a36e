"""PI-HC-MoE, physics-informed hard-constraint experts: ``config`` (its section),
``mixture`` (the basis network and the domain decomposition), ``hard_constraint`` (the
constrained solve and its implicit backward), ``training`` (one step's math), ``pde`` (the
problems and their reference solvers), ``driver`` (the Ray schedule). All but the driver
are plain torch."""
