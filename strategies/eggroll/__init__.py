"""EGGROLL, low-rank evolution strategies: ``config`` (its section), ``lowrank`` (noise,
population forward and update: plain torch), ``tasks`` (the fitness functions), ``driver``
(the Ray schedule)."""
