"""The networks the data strategies train, one module per family (``model.kind``).

A network is an ``nn.Sequential`` of *units*, the pieces a pipeline places on its blocks,
followed by the output layer. ``network.build_network`` builds any family; ``units``
measures what each unit takes, gives and costs; ``heads`` builds the local heads of a cut
network; ``loss`` scores any family's output.

Nothing is imported here: the strategy registry looks for a ``config`` module in every
package under ``strategies/``, and validating a config must not load torch.
"""
