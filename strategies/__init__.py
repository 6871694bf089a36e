"""The training algorithms, one folder each (``strategies/<kind>/``): ``config.py`` (its
config section, registered by kind), ``driver.py`` (the ``Strategy`` that schedules its
Ray workers) and its math in plain modules with no Ray. Shared here: ``base`` (the
contract), ``config``, ``registry``, ``network``, ``optim``."""
