"""End-to-end backpropagation in one worker: the baseline every other strategy is measured
against (``config``: its section, ``driver``: the Ray driver)."""
