"""Peak process memory of one `small` training step (fwd+bwd), one backend per fresh process.

The runner's CPU peak column samples RSS inside a process that already ran other backends, so
freed pages are reused and fwd+bwd peaks read low; this measures ``ru_maxrss`` of a fresh process
instead: build the model and batch, run one warm-up step, then one measured step.

    .venv/bin/python benchmarks/peak_rss_model_step.py reference
    .venv/bin/python benchmarks/peak_rss_model_step.py auto
"""

import os
import resource
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.cases import model as M  # noqa: E402


def main(backend: str, preset: str = "small", batch: int = 4) -> None:
    cfg = M.preset(preset)
    model = M._model(preset, "cpu").set_backend(backend)
    b = M._batch(cfg, batch, "cpu")
    for _ in range(2):
        model.zero_grad(set_to_none=False)
        model(b, validate=False).loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{preset} B={batch} backend={backend}: peak RSS {peak:.0f} MB")


if __name__ == "__main__":
    main(*sys.argv[1:2] or ["auto"])
