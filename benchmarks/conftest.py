"""pytest options of the pytest-benchmark entry point (benchmarks/test_bench.py):

    pytest benchmarks/ --benchmark-only [--bench-device cpu|cuda] [--bench-full] [--bench-ops d3diff,moe]
                       [--bench-dtype bf16,fp32] [--bench-compile] [--bench-no-peers]
                       [--bench-no-flush-l2] [--bench-cuda-graph] [--benchmark-json PATH] ...

Quick sizes unless ``--bench-full``; ``--bench-ops`` filters as ``run.py``'s OP arguments.
"""


def pytest_addoption(parser):
    g = parser.getgroup("unif2ace-bench", "unif2ace benchmark registry (benchmarks/cases)")
    g.addoption("--bench-device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    g.addoption("--bench-full", action="store_true", help="full sizes (default: the quick sizes)")
    g.addoption("--bench-ops", default="", metavar="A,B", help="case families / ops / files, as run.py's OP")
    g.addoption("--bench-dtype", default="", metavar="A,B", help="only cases of these dtypes (bf16, fp32, ...)")
    g.addoption("--bench-compile", action="store_true", help="time torch.compile(reference) in quick CPU mode too")
    g.addoption("--bench-no-peers", action="store_true", help="leave out the peers")
    g.addoption("--bench-no-flush-l2", action="store_true", help="CUDA: do not flush L2 between timed calls")
    g.addoption("--bench-cuda-graph", action="store_true", help="CUDA: time forwards as CUDA graph replays")
