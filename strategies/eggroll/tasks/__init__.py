"""The fitness functions EGGROLL optimises: a gym policy, the run's network on the run's data
(a classifier, or a language model), a character-level GRU LM on its own corpus.

Pure torch and gymnasium, no Ray. Every task keeps one rule that sharding a population
across workers depends on: member j's fitness is a function of (generation, seed, j's
perturbation) alone, never of which other members share the call. So all members of a
generation meet the same environment seeds or the same batch (common random numbers):
workers scoring different shards use one yardstick, and fitness differences between
members measure their perturbations rather than their luck.

Inside ``population(model, noise)`` the models take inputs with a leading member dim k;
a shared input is ``expand``-ed to it (no copy), and one model call serves all k members.
"""
