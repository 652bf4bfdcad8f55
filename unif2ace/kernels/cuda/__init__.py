"""cuda backend: Python host glue of the CUDA kernels (csrc/cuda/<stem>.cu, ``torch.ops.unif2ace_cuda``).

One module per stem (``unif2ace.kernels.cuda.<stem>``), defining the entry points its op records
declare (see :class:`unif2ace.kernels._dispatch.Op`). Cases a kernel does not cover fall back to the
reference here, where the limit is known.
"""
