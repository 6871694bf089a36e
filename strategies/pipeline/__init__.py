"""The update-unlocked pipeline: ``config`` (its section), ``local_learning`` (the blocks,
their heads and cut points: plain torch), ``driver`` (the Ray schedule)."""
