"""NoProp, discrete time (Li, Teh & Pascanu, arXiv:2503.24322): ``config`` (its section),
``diffusion`` (the schedule, the Gaussian posterior and the losses: plain torch),
``denoiser`` (one block's network and its local training), ``driver`` (the Ray schedule)."""
