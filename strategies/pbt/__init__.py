"""Population based training over any other strategy: ``config`` (its section),
``scheduler`` and ``search_space`` (the decisions: plain Python, no Ray), ``driver`` (the
slots, the states handed between them, the books)."""
