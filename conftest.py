"""Root pytest configuration.

Without a CUDA GPU, Triton kernels run on the CPU under Triton's interpreter: TRITON_INTERPRET=1
must be set before any ``@triton.jit`` decorator runs, so it is set here, before any unif2ace
kernel module is imported, and the interpreter is patched to compute bf16 faithfully.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    from unif2ace.testing import patch_interpreter_bf16

    patch_interpreter_bf16()

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.dirname(__file__), ".cache", "inductor"))

import pytest  # noqa: E402

# Under pytest-xdist each worker gets its share of the cores (2 workers x 2 threads on a 2-core
# machine oversubscribe and slow everything down several-fold).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none found)")
    skip_slow = pytest.mark.skip(reason="slow: pass --runslow to run")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)


def pytest_terminal_summary(terminalreporter):
    """Count the CUDA kernel tests that ran through the CPU emulator (marker cuda_emu)."""
    counts = {}
    for outcome in ("passed", "failed", "xfailed", "xpassed", "skipped", "error"):
        for rep in terminalreporter.stats.get(outcome, []):
            if "cuda_emu" in getattr(rep, "keywords", {}) and (rep.when == "call" or outcome in ("skipped", "error")):
                counts[outcome] = counts.get(outcome, 0) + 1
    if counts:
        ran = sum(v for k, v in counts.items() if k != "skipped")
        detail = ", ".join(f"{v} {k}" for k, v in counts.items())
        terminalreporter.write_line(f"CUDA kernel tests run through the CPU emulator: {ran} ({detail})")


@pytest.fixture(autouse=True)
def _cuda_emulation(request):
    """Tests marked cuda_emu (the ``cuda`` backend's parameter with id ``cuda_emu``, see
    unif2ace.testing.cuda_emu.cuda_backends) run the cuda backend through the CPU emulator."""
    if request.node.get_closest_marker("cuda_emu") is None:
        yield
        return
    from unif2ace.testing import cuda_emu

    with cuda_emu.emulated_cuda():
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def gpu_device():
    return torch.device("cuda")
