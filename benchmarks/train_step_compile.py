#!/usr/bin/env python
"""Eager vs ``torch.compile(fullgraph=True)`` training steps of the demo config (issue 20 item 4).

    python benchmarks/train_step_compile.py [--steps 10] [--rounds 4] [--threads 0] [--batch-size 32]

Builds the demo's trainer (tiny preset + the demo overrides, the synthetic set), compiles the
model's forward with ``fullgraph=True`` (the backward follows through AOTAutograd), then times
forward + backward + AdamW steps on one fixed batch, eager and compiled interleaved, ``--rounds``
rounds of ``--steps`` steps each, and prints the best round of each (process CPU seconds per step,
which a busy machine disturbs less than wall time, and wall seconds) with the one-off compile time.
The demo trains eagerly: a compiled step has to save more than the compile costs over the demo's
steps (the measured numbers: README.md, "Demo recipe").
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(ROOT / ".cache" / "inductor"))

import torch  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--batch-size", type=int, default=32, dest="batch_size")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from unif2ace.data.shards import TokenDataset
    from unif2ace.data.synthetic import SyntheticSpec, build_synthetic
    from unif2ace.train.demo import demo_config
    from unif2ace.train.trainer import Trainer, _sample_key, make_batch

    with tempfile.TemporaryDirectory(prefix="unif2ace-compile-") as tmp:
        cfg = demo_config(os.path.join(tmp, "run"), progress=False, batch_size=args.batch_size)
        cfg.data = build_synthetic(
            SyntheticSpec(num_images=cfg.synthetic_images, num_codes=cfg.model_config().codebook_size)
        )
        ds = TokenDataset(cfg.data)
        tr = Trainer(cfg, dataset=ds, log=lambda *a: None)
        _, idx = tr.sampler.rank_slice(0)
        keys = [_sample_key(cfg.seed, 0, j) for j in range(len(idx))]
        batch = make_batch(tr.mcfg, [ds[int(i)] for i in idx], keys, tr.device).validate(tr.mcfg)
        model = tr.model
        compiled = torch.compile(model, fullgraph=True)

        def step(fwd):
            out = fwd(batch, validate=False)
            out.loss.backward()
            tr.opt.step()
            tr.opt.zero_grad(set_to_none=True)

        t0, c0 = time.perf_counter(), time.process_time()
        step(compiled)
        compile_wall, compile_cpu = time.perf_counter() - t0, time.process_time() - c0
        step(model)
        best = {}
        for _ in range(args.rounds):
            for name, fwd in (("eager", model), ("compiled", compiled)):
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(args.steps):
                    step(fwd)
                wall, cpu = (time.perf_counter() - t0) / args.steps, (time.process_time() - c0) / args.steps
                b = best.setdefault(name, [wall, cpu])
                best[name] = [min(b[0], wall), min(b[1], cpu)]
    print(f"threads {torch.get_num_threads()}, batch {args.batch_size}, best of {args.rounds} x {args.steps} steps")
    print("| step | wall s/step | CPU s/step |")
    print("|---|---|---|")
    for name, (wall, cpu) in best.items():
        print(f"| {name} | {wall:.3f} | {cpu:.3f} |")
    print(
        f"compiled/eager CPU time: {best['compiled'][1] / best['eager'][1]:.2f}; first compiled step (compile): "
        f"{compile_wall:.0f} s wall, {compile_cpu:.0f} s CPU in this process (compile workers not counted)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
