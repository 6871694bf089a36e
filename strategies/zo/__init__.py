"""MeZO, zeroth-order SPSA: ``config`` (its section), ``spsa`` (seeded directions, the
two-point estimate and the update: plain torch), ``driver`` (the Ray schedule)."""
