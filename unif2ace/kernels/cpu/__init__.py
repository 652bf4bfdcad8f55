"""cpu backend: Python host glue of the C++/OpenMP kernels (csrc/cpu/<stem>.cpp, ``torch.ops.unif2ace_cpu``).

One module per stem (``unif2ace.kernels.cpu.<stem>``), defining the entry points its op records
declare (see :class:`unif2ace.kernels._dispatch.Op`).
"""
