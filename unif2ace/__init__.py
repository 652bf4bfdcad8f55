"""unif2ace: fast kernels for UniF²ace-style models (grouped MoE routing, masked token sampling,
D3Diff score loss) behind a thin model layer.

``unif2ace.kernels`` holds the public ops; ``python -m unif2ace info`` shows which backends are built.
"""

__version__ = "0.1.0"
