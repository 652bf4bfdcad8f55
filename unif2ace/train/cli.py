"""``unif2ace train | generate | answer | demo`` (subcommands of the ``unif2ace`` console script)."""

from __future__ import annotations

import argparse
import json
import os
import sys

__all__ = ["add_subcommands", "run_subcommand", "COMMANDS"]

COMMANDS = ("train", "generate", "answer", "demo")


def add_subcommands(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (preset or JSON config) on the synthetic set or a shard directory",
        description="Train with AdamW + warmup/cosine. Multi-process: torchrun --nproc-per-node N "
        "-m unif2ace train ... (DDP, or FSDP2 with --fsdp; gloo on CPU, nccl on GPU). A non-empty --out "
        "is refused unless --resume continues the run in it or --overwrite replaces it.",
    )
    p.add_argument("--config", help="JSON file with TrainConfig fields (command-line flags override it)")
    p.add_argument("--preset", help="model preset: tiny | small | paper | showo")
    p.add_argument(
        "--model",
        help="JSON object of UniF2aceConfig overrides, merged into the config's overrides "
        "(e.g. '{\"num_layers\": 4}'; a null value drops an override: the preset's value applies)",
    )
    p.add_argument("--data", help="'synthetic' (default) or a pre-tokenized shard directory")
    p.add_argument("--out", help="run directory (checkpoints, metrics.jsonl, loss_curve.png)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int, dest="batch_size")
    p.add_argument("--grad-accum", type=int, dest="grad_accum")
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup-steps", type=int, dest="warmup_steps")
    p.add_argument("--grad-clip", type=float, dest="grad_clip")
    p.add_argument("--seed", type=int)
    p.add_argument("--backend", help="auto (fused ops) | reference | cpu | triton | cuda")
    p.add_argument("--device", help="auto | cpu | cuda")
    p.add_argument("--amp", help="auto | bf16 | none")
    p.add_argument("--ckpt-every", type=int, dest="ckpt_every")
    p.add_argument("--log-every", type=int, dest="log_every")
    p.add_argument("--max-minutes", type=float, dest="max_minutes")
    p.add_argument("--no-progress", action="store_false", dest="progress", default=None)
    p.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="torch.compile(fullgraph=True) the forward (one process; slower to start: README.md, Demo recipe)",
    )
    p.add_argument(
        "--resume",
        help="checkpoint or run directory to continue from ('auto': the --out directory; a run directory "
        "falls back past damaged checkpoints to its newest good one)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in a non-empty --out (deletes only the files a run writes there)",
    )
    p.add_argument(
        "--fsdp",
        action="store_true",
        default=None,
        help="FSDP2: shard parameters, gradients and optimizer state (fully_shard; bf16 compute on GPU); "
        "sharded checkpoints (torch.distributed.checkpoint) that resume on any number of processes",
    )

    g = sub.add_parser("generate", help="generate faces from captions into a PNG grid")
    g.add_argument("run", help="run directory, model.safetensors or a training checkpoint")
    g.add_argument("captions", nargs="+", help="captions (words of the run's tokenizer)")
    g.add_argument("--out", default="generated.png")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int)
    g.add_argument("--guidance", type=float)
    g.add_argument("--temperature", type=float)
    g.add_argument("--per-caption", type=int, default=1, dest="per_caption")
    g.add_argument("--backend", default="auto")

    a = sub.add_parser("answer", help="answer a question about an image")
    a.add_argument("run", help="run directory, model.safetensors or a training checkpoint")
    src = a.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="a PNG of the tokenizer's size")
    src.add_argument("--codes", help="a .npy file with the [L] image code grid")
    src.add_argument("--attributes", help="synthetic face attributes, e.g. 'hair_color=red,hat=blue' (rest random)")
    a.add_argument("question", nargs="+")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--max-new-tokens", type=int, default=8, dest="max_new_tokens")
    a.add_argument("--backend", default="auto")

    d = sub.add_parser("demo", help="the main job: train tiny on the synthetic faces, generate, answer, report")
    d.add_argument("--out", default="results/demo")
    d.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps (default: the demo's fixed count; the figures are comparable only at that count)",
    )
    d.add_argument("--seed", type=int, default=0)
    d.add_argument(
        "--no-benchmark",
        action="store_false",
        dest="benchmark",
        default=True,
        help="skip the quick kernel benchmark (its table in the report)",
    )
    d.add_argument("--setup-seconds", type=float, default=None, dest="setup_seconds", help=argparse.SUPPRESS)
    d.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: 2 on every machine, so the figures do not depend on its core count; "
        "0: torch's default)",
    )
    d.add_argument("--no-progress", action="store_false", dest="progress", default=True)
    d.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a unif2ace run in OUT/run that is not a previous demo run (a previous demo run is "
        "always replaced, with a message; only the files a run writes are deleted)",
    )


def _train_config(args):
    """The TrainConfig of ``unif2ace train`` flags: --config file, then flags; --model merges."""
    from .config import TrainConfig

    flags = {
        k: getattr(args, k)
        for k in (
            "preset",
            "data",
            "out",
            "steps",
            "batch_size",
            "grad_accum",
            "lr",
            "warmup_steps",
            "grad_clip",
            "seed",
            "backend",
            "device",
            "amp",
            "ckpt_every",
            "log_every",
            "max_minutes",
            "progress",
            "fsdp",
            "compile",
        )
    }
    flags = {k: v for k, v in flags.items() if v is not None}
    base = TrainConfig.read_file(args.config) if args.config else {}
    if args.model is not None:
        try:
            over = json.loads(args.model)
        except json.JSONDecodeError as e:
            raise ValueError(f"train: --model must be a JSON object of config overrides: {e}") from None
        if not isinstance(over, dict):
            raise ValueError(f"train: --model must be a JSON object of config overrides, got {args.model!r}")
        model = dict(base.get("model", TrainConfig().model))
        if not isinstance(model, dict):
            raise ValueError(f"train: the config file's 'model' must be a JSON object, got {model!r}")
        for k, v in over.items():  # merge: --model changes only the fields it names
            if v is None:
                model.pop(k, None)
            else:
                model[k] = v
        flags["model"] = model
    where = f"config file {args.config!r} + flags" if args.config else "flags"
    return TrainConfig.from_dict({**base, **flags}, where=where)


def _train(args) -> int:
    from .trainer import train

    cfg = _train_config(args)
    try:
        s = train(cfg, resume=args.resume, overwrite=args.overwrite)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            # tear the process group down before exit (an undestroyed gloo group can abort at exit);
            # first collect what the run left in reference cycles (likely, not verified: the FSDP
            # model and its device mesh, which hold the group). Without this, a rank aborted at
            # interpreter shutdown ("terminate called without an active exception") in 2 of 38
            # loaded two-process runs; with it, 0 of 80.
            import gc

            gc.collect()
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in s.items() if k != "history"}))
    return 0


def _generate(args) -> int:
    from unif2ace.data.png import image_grid, write_png

    from .evaluate import generate_faces, load_run

    if args.steps is not None and args.steps < 1:
        raise ValueError(f"generate: --steps must be >= 1 (MaskGIT decoding steps), got {args.steps}")
    if args.per_caption < 1:
        raise ValueError(f"generate: --per-caption must be >= 1, got {args.per_caption}")
    run = load_run(args.run, backend=args.backend)
    caps = [c for c in args.captions for _ in range(args.per_caption)]
    codes, imgs = generate_faces(
        run, caps, seed=args.seed, steps=args.steps, guidance=args.guidance, temperature=args.temperature
    )
    if imgs is None:
        import numpy as np

        path = os.path.splitext(args.out)[0] + ".npy"
        np.save(path, codes)
        print(f"wrote image codes {list(codes.shape)} to {path} (this run has no image decoder)")
    else:
        write_png(
            args.out, image_grid(imgs, cols=max(1, args.per_caption) if len(args.captions) > 1 else min(8, len(caps)))
        )
        print(f"wrote {len(caps)} faces to {args.out}")
    return 0


def _answer(args) -> int:
    import numpy as np

    from unif2ace.data import faces

    from .evaluate import load_run

    if args.max_new_tokens < 1:
        raise ValueError(f"answer: --max-new-tokens must be >= 1, got {args.max_new_tokens}")
    run = load_run(args.run, backend=args.backend)
    if args.codes:
        try:
            codes = np.load(args.codes)
        except (OSError, ValueError, EOFError) as e:  # EOFError: a zero-byte file
            raise ValueError(f"answer: cannot read --codes {args.codes!r}: {type(e).__name__}: {e}") from None
        cfg = run.model.cfg
        if not np.issubdtype(codes.dtype, np.integer) or codes.size != cfg.image_tokens:
            raise ValueError(
                f"answer: --codes must hold {cfg.image_tokens} integer image codes, "
                f"got {codes.dtype} {list(codes.shape)}"
            )
        if codes.min() < 0 or codes.max() >= cfg.codebook_size:
            raise ValueError(f"answer: --codes values must be in [0, {cfg.codebook_size})")
        codes = codes.reshape(1, -1).astype(np.int64)
    else:
        if run.vq is None:
            raise ValueError("answer: this run has no image tokenizer; pass --codes")
        if args.image:
            from unif2ace.data.png import read_png

            img = read_png(args.image)
        else:
            rng = np.random.default_rng(args.seed)
            attrs = faces.sample_attributes(rng)
            for kv in args.attributes.split(","):
                k, _, v = kv.partition("=")
                if k.strip() not in faces.ATTRIBUTES or v.strip() not in faces.ATTRIBUTES[k.strip()]:
                    raise ValueError(
                        f"answer: --attributes: bad item {kv!r}; attributes and values: {faces.ATTRIBUTES}"
                    )
                attrs[k.strip()] = v.strip()
            print("face:", attrs)
            img = faces.render(attrs)
        codes = run.vq.encode(img[None])
    q = run.encode_text(" ".join(args.question))
    ans = run.model.answer(codes, [q], max_new_tokens=args.max_new_tokens, temperature=0.0, seed=args.seed)[0]
    print(run.tokenizer.decode(ans) if run.tokenizer is not None else ans)
    return 0


def _demo(args) -> int:
    from .demo import DEMO_STEPS, DEMO_THREADS, run_demo

    if args.steps is not None and args.steps < 1:
        raise ValueError(f"demo: --steps must be >= 1, got {args.steps}")
    run_demo(
        args.out,
        steps=args.steps or DEMO_STEPS,
        benchmark=args.benchmark,
        setup_seconds=args.setup_seconds,
        seed=args.seed,
        threads=DEMO_THREADS if args.threads is None else args.threads,
        progress=args.progress,
        overwrite=args.overwrite,
    )
    return 0


def run_subcommand(args) -> int:
    """Run one subcommand. A user error (bad flag value, config, data, checkpoint or run directory,
    a missing file, a non-finite loss) is one line on stderr and exit status 2; Ctrl-C is exit 130."""
    fn = {"train": _train, "generate": _generate, "answer": _answer, "demo": _demo}[args.cmd]
    try:
        return fn(args)
    except (ValueError, OSError, FloatingPointError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"unif2ace {args.cmd}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"unif2ace {args.cmd}: interrupted", file=sys.stderr)
        return 130
