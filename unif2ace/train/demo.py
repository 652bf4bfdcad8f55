"""The main job: train ``tiny`` on the synthetic face set with the fused ops, then evaluate and report.

Steps: build (or reuse) the synthetic set and its patch VQ; train (fused backends, ``auto``; if a
fused op fails the run restarts on the reference backend with a printed message); time a few
training steps on the fused and on the reference backend; generate faces for held-out captions
(PNG grid: truth render | generated, pairs side by side); answer held-out questions; read the
attributes back from the generated images with the renderer-built decoder; write ``report.md`` and
``report.json`` (with the loss curve ``loss_curve.png`` and ``samples.png``).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
import traceback
from typing import Dict, Optional

import numpy as np
import torch

from unif2ace.data import faces
from unif2ace.data.png import image_grid, write_png

from .checkpoint import RunDirectoryError, read_run_info
from .config import TrainConfig
from .trainer import Trainer

__all__ = ["run_demo", "time_backends"]

DEMO_STEPS = 2200


def time_backends(cfg: TrainConfig, data, steps: int = 12, warmup: int = 3) -> Dict[str, Dict]:
    """Tokens/s and s/step of training steps on the fused (``auto``) and the reference backend,
    same data, same model init, measured back to back."""
    out = {}
    # the timing trainers never write (no run(), no save()); their --out is a fresh temporary directory
    with tempfile.TemporaryDirectory(prefix="unif2ace-speed-") as tmp:
        for name, be in (("fused", "auto"), ("reference", "reference")):
            c = TrainConfig(**{**cfg.to_dict(), "backend": be, "progress": False, "out": os.path.join(tmp, name)})
            try:
                tr = Trainer(c, dataset=data, log=lambda *a: None)
                for _ in range(warmup):
                    tr.train_step()
                t0 = time.perf_counter()
                tok = sum(tr.train_step()["tokens"] for _ in range(steps))
                dt = time.perf_counter() - t0
                out[name] = {"backend": be, "tokens_per_s": tok / dt, "s_per_step": dt / steps, "steps": steps}
            except Exception as e:  # a broken fused op must not sink the demo
                out[name] = {"backend": be, "error": f"{type(e).__name__}: {e}"}
    return out


def _train_with_fallback(cfg: TrainConfig, log, overwrite: bool) -> Dict:
    try:
        summary = Trainer(cfg, log=log, overwrite=overwrite, origin="demo").run()
        summary["backend"] = cfg.backend
        return summary
    except (RuntimeError, FloatingPointError, NotImplementedError) as e:
        if cfg.backend == "reference":
            raise
        log(f"[demo] training with the fused ops failed ({type(e).__name__}: {e}); restarting on the reference backend")
        traceback.print_exc()
        ref = TrainConfig(**{**cfg.to_dict(), "backend": "reference"})
        # the failed run is this demo's own: replacing it deletes only the files it wrote
        summary = Trainer(ref, log=log, overwrite=read_run_info(cfg.out) is not None, origin="demo").run()
        summary["backend"] = "reference (fused failed: " + f"{type(e).__name__})"
        return summary


def check_demo_out(out: str, overwrite: bool, log=print) -> bool:
    """Whether the demo may train into ``out/run``: yes when it is empty or missing, or holds a previous
    demo run (replaced, with a message), or holds another unif2ace run and ``overwrite`` is set.
    Anything else raises :class:`RunDirectoryError`. Returns the ``overwrite`` the trainer needs."""
    run_dir = os.path.join(out, "run")
    if not os.path.isdir(run_dir) or not os.listdir(run_dir):
        if os.path.exists(run_dir) and not os.path.isdir(run_dir):
            raise RunDirectoryError(f"demo: {run_dir!r} is a file; choose another --out")
        return False
    info = read_run_info(run_dir)
    if info is not None and (info.get("origin") == "demo" or overwrite):
        log(
            f"[demo] replacing the previous {'demo ' if info.get('origin') == 'demo' else ''}run in {run_dir} "
            "(only the files it wrote)"
        )
        return True
    what = "another unif2ace run (pass --overwrite to replace it)" if info else "files unif2ace did not write"
    raise RunDirectoryError(f"demo: {run_dir!r} holds {what}; choose another --out")


def run_demo(
    out: str = "results/demo",
    *,
    steps: int = DEMO_STEPS,
    max_minutes: float = 5.0,
    n_gen: int = 48,
    n_vqa: int = 64,
    seed: int = 0,
    threads: int = 0,
    progress: bool = True,
    overwrite: bool = False,
    log=print,
) -> Dict:
    from .evaluate import eval_generation, eval_vqa, load_run

    t_all = time.perf_counter()
    replace = check_demo_out(out, overwrite, log)
    os.makedirs(out, exist_ok=True)
    run_dir = os.path.join(out, "run")
    if threads:
        torch.set_num_threads(threads)
    cfg = TrainConfig(
        out=run_dir, steps=steps, seed=seed, threads=threads, progress=progress, log_every=10, ckpt_every=500
    )
    from unif2ace.data.shards import TokenDataset
    from unif2ace.data.synthetic import SyntheticSpec, build_synthetic

    data_path = build_synthetic(
        SyntheticSpec(num_images=cfg.synthetic_images, num_codes=cfg.model_config().codebook_size), verbose=True
    )
    cfg.data = data_path
    log("[demo] timing fused vs reference training steps ...")
    speed = time_backends(cfg, TokenDataset(data_path))
    fused = speed.get("fused", {})
    per_step = fused.get("s_per_step") or speed.get("reference", {}).get("s_per_step")
    if per_step and max_minutes:
        fit = int(60 * max_minutes / (per_step * 1.1))  # 10% margin for logging and checkpoints
        if fit < steps:
            log(
                f"[demo] {steps} steps at {per_step:.3f} s/step exceed the {max_minutes} min training budget; "
                f"training {fit} steps instead"
            )
            cfg.steps = max(fit, 50)
    cfg.max_minutes = 1.5 * max_minutes  # a hard stop in case the machine slows down mid-run
    log(
        f"[demo] training preset '{cfg.preset}' with {cfg.model} on the synthetic face set, {cfg.steps} steps, "
        f"batch {cfg.global_batch}, device {'cuda' if torch.cuda.is_available() else 'cpu'}"
    )
    t0 = time.perf_counter()
    summary = _train_with_fallback(cfg, log, replace)
    train_s = time.perf_counter() - t0
    log(
        f"[demo] trained {summary['steps']} steps in {summary['wall_s']:.0f} s "
        f"({summary['tokens_per_s']:.0f} tokens/s), final loss {summary['final_loss']:.3f}"
    )

    run = load_run(run_dir, backend="auto" if summary["backend"] == "auto" else "reference")
    log("[demo] building the attribute decoder from the renderer ...")
    decoder = faces.AttributeDecoder(roundtrip=run.vq.roundtrip)
    from unif2ace.data.synthetic import held_out_split

    gen_attrs = held_out_split(n_gen, seed=1001)
    t0 = time.perf_counter()
    gen = eval_generation(run, gen_attrs, decoder, seed=seed)
    gen_s = time.perf_counter() - t0
    log(
        f"[demo] generated {n_gen} faces in {gen_s:.1f} s: attribute accuracy {gen['accuracy']:.1%} "
        f"(chance {gen['chance']:.1%})"
    )
    # the tokenizer + decoder ceiling: attributes read back from VQ round trips of the true renders
    truth_imgs = np.stack([faces.render(a) for a in gen_attrs])
    ceil_pred = decoder.predict(run.vq.roundtrip(truth_imgs))
    ceiling = float(np.mean([[p[a] == t[a] for a in faces.ATTRIBUTES] for p, t in zip(ceil_pred, gen_attrs)]))
    pairs = np.stack([x for pair in zip(truth_imgs, gen["images"]) for x in pair])
    write_png(os.path.join(out, "samples.png"), image_grid(pairs, cols=12, scale=4))
    t0 = time.perf_counter()
    vqa = eval_vqa(run, held_out_split(n_vqa, seed=2002), per_image=3, seed=seed)
    vqa_s = time.perf_counter() - t0
    log(
        f"[demo] answered {vqa['n']} held-out questions in {vqa_s:.1f} s: accuracy {vqa['accuracy']:.1%} "
        f"(chance {vqa['chance']:.1%})"
    )
    shutil.copy(os.path.join(run_dir, "loss_curve.png"), os.path.join(out, "loss_curve.png"))
    total_s = time.perf_counter() - t_all
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "model": {"preset": cfg.preset, "overrides": cfg.model, "parameters": run.model.num_parameters()},
        "training": {k: v for k, v in summary.items() if k != "history"}
        | {"train_s": train_s, "global_batch": cfg.global_batch, "lr": cfg.lr},
        "generation": {k: gen[k] for k in ("accuracy", "per_attribute", "chance", "all_attributes_correct", "n")}
        | {
            "decoder_ceiling": ceiling,
            "seconds": gen_s,
            "guidance": run.model.cfg.guidance_scale,
            "steps": run.model.cfg.gen_steps,
            "examples": [{"caption": c, "read_back": p} for c, p in zip(gen["captions"][:6], gen["predicted"][:6])],
        },
        "vqa": {k: vqa[k] for k in ("accuracy", "per_attribute", "chance", "n", "examples")} | {"seconds": vqa_s},
        "speed": speed,
        "total_s": total_s,
    }
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(render_markdown(report))
    log(f"[demo] done in {total_s:.0f} s; report: {os.path.join(out, 'report.md')}")
    return report


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def render_markdown(r: Dict) -> str:
    tr, g, v, sp = r["training"], r["generation"], r["vqa"], r["speed"]
    lines = [
        "# unif2ace demo report",
        "",
        f"{r['date']} · {r['device']} ({r['cpu_threads']} threads) · torch {r['torch']} · "
        f"model `{r['model']['preset']}` + {r['model']['overrides']} ({r['model']['parameters']:,} parameters)",
        "",
        "## Training",
        "",
        f"- {tr['steps']} steps (global batch {tr['global_batch']}, AdamW lr {tr['lr']}, warmup + cosine) in "
        f"{tr['wall_s']:.0f} s on backend `{tr['backend']}`; {tr['tokens_per_s']:.0f} tokens/s; final loss "
        f"{tr['final_loss']:.3f}{' (stopped early by the time budget)' if tr['stopped_early'] else ''}",
        "- loss curves: `loss_curve.png` (log scale; blue total, orange MMU, green D3Diff, red mask CE)",
        "",
        "## Results (held-out attribute combinations)",
        "",
        "| metric | accuracy | chance |",
        "|---|---|---|",
        f"| attributes read back from generated faces ({g['n']} faces x 12 attributes) | **{_pct(g['accuracy'])}** "
        f"| {_pct(g['chance'])} |",
        f"| all 12 attributes right in one face | {_pct(g['all_attributes_correct'])} | "
        f"{_pct(float(np.prod([1 / len(v_) for v_ in faces.ATTRIBUTES.values()])))} |",
        f"| VQA answers ({v['n']} questions, greedy) | **{_pct(v['accuracy'])}** | {_pct(v['chance'])} |",
        "",
        "Decoder ceiling (attributes read back from VQ round trips of the true renders): "
        f"{_pct(g['decoder_ceiling'])}.",
        f"Generation: {g['steps']} MaskGIT steps, guidance {g['guidance']}; samples in `samples.png` "
        "(pairs: true render, generated).",
        "",
        "| attribute | generation | VQA |",
        "|---|---|---|",
    ]
    for a in faces.ATTRIBUTES:
        lines.append(f"| {a} | {_pct(g['per_attribute'].get(a))} | {_pct(v['per_attribute'].get(a))} |")
    lines += [
        "",
        "## Training speed, fused vs reference (same machine, back to back)",
        "",
        "| backend | tokens/s | s/step |",
        "|---|---|---|",
    ]
    for name, s in sp.items():
        if "error" in s:
            lines.append(f"| {name} | failed: {s['error']} | |")
        else:
            lines.append(f"| {name} (`{s['backend']}`) | {s['tokens_per_s']:.0f} | {s['s_per_step']:.3f} |")
    lines += ["", "## Examples", ""]
    for e in v["examples"][:8]:
        lines.append(f"- Q: {e['question']} → `{e['answer']}` (truth `{e['truth']}`)")
    lines += ["", f"Total demo time: {r['total_s']:.0f} s.", ""]
    return "\n".join(lines)
