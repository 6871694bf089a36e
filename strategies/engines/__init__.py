"""Engines: what runs a worker's gradient step (plain torch, Accelerate or DeepSpeed).

Every strategy with a local gradient update (pipeline blocks, the backprop baseline, the
MoE-HC basis network) trains through one ``Engine`` built by ``build_engine`` from the
run's ``engine`` section, so mixed precision, gradient accumulation and ZeRO are options of
the run, not code paths of a strategy. No Ray here: each worker is its own process and
builds its own engine, a world of one.

The package imports nothing itself: the strategy registry looks into every folder of
``strategies`` for a config, and reading a config must not import torch.
"""
