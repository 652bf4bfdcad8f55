"""The ``torch.library`` custom ops behind the public ops, one module per family (fake
implementations, autograd). Every non-reference backend runs behind them, so the public ops work
under ``torch.compile(fullgraph=True)``; they reach the kernels through
``Op.kernels(backend).<entry point>``.
"""
