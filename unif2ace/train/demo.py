"""The main job: train ``tiny`` on the synthetic face set with the fused ops, then evaluate and report.

The same result on any machine: a fixed number of steps (:data:`DEMO_STEPS`) with fixed seeds
(training, data, generation, questions), so the figures depend on the machine only through float
non-determinism; the time it takes is estimated up front from the first timed steps and printed.

Steps: build (or reuse) the synthetic set and its patch VQ; time training steps on the fused and on
the reference backend (and the share of a fused step spent in the fused ops), which gives the time
estimate; train (fused backends, ``auto``; if a fused op fails the run restarts on the reference
backend with a printed message); generate :data:`N_GEN` faces for held-out captions and read their
attributes back with the renderer-built decoder; answer :data:`N_VQA_IMAGES` x
:data:`QUESTIONS_PER_IMAGE` held-out questions; run the quick kernel benchmark on the same machine;
write ``report.md`` and ``report.json`` with ``samples.png`` (captioned pairs: true render,
generated face) and ``loss_curve.png``.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from unif2ace.data import faces
from unif2ace.data.png import GLYPH_H, draw_text, text_width, write_png

from .checkpoint import RunDirectoryError, read_run_info
from .config import TrainConfig
from .trainer import Trainer

__all__ = ["run_demo", "time_backends", "demo_config", "samples_picture", "DEMO_STEPS", "DEMO_THREADS"]

DEMO_STEPS = 1200  # about 4 min of training on a quiet 2-core CPU (~0.2 s/step); README.md, Demo recipe
# torch threads of `python -m unif2ace demo` on every machine (--threads overrides): the reduction order
# of the CPU kernels depends on the thread count, and training amplifies rounding differences into
# different figures (README.md, Demo recipe), so the demo's figures are those of 2 threads everywhere
DEMO_THREADS = 2
N_GEN = 256  # generated faces (held-out captions)
N_VQA_IMAGES = 250  # held-out faces asked about ...
QUESTIONS_PER_IMAGE = 4  # ... this many distinct attributes each: 1000 questions
SAMPLES_SHOWN = 32  # pairs in samples.png
# evaluation cost in training-step equivalents per generated face / per question, and fixed seconds
# (decoder, rendering); measured on the demo config, used only for the printed estimate
_EVAL_STEPS_PER_FACE = 0.05  # without guidance: one forward per MaskGIT step
_EVAL_STEPS_PER_QUESTION = 0.012
_EVAL_FIXED_S = 15.0
_BENCHMARK_S = 100.0  # the quick kernel benchmark: its --time-limit (90 s) and start-up


def demo_config(out: str, *, steps: int = DEMO_STEPS, seed: int = 0, threads: int = 0, progress: bool = True, **kw):
    """The demo's training config: the defaults of :class:`TrainConfig` (the ``tiny`` preset with
    :data:`~unif2ace.train.config.DEMO_MODEL_OVERRIDES` on the synthetic set) with the image-code
    embeddings initialised from the patch VQ's codebook (``image_embedding_init="codebook"``)."""
    kw.setdefault("image_embedding_init", "codebook")
    return TrainConfig(
        out=out, steps=steps, seed=seed, threads=threads, progress=progress, log_every=10, ckpt_every=500, **kw
    )


def _fused_op_share(trainer: Trainer, steps: int = 3) -> Dict[str, float]:
    """Share of the wall time of ``steps`` training steps spent inside ``unif2ace::`` ops (the fused
    kernels, forward and backward), from the PyTorch profiler; per op name too."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        wall_us = (time.perf_counter() - t0) * 1e6

    def outermost(e):
        p = e.cpu_parent
        while p is not None:
            if p.name.startswith("unif2ace::"):
                return False
            p = p.cpu_parent
        return True

    per: Dict[str, float] = {}
    for e in prof.events():
        if e.name.startswith("unif2ace::") and outermost(e):
            per[e.name] = per.get(e.name, 0.0) + e.cpu_time_total
    return {
        "share": sum(per.values()) / wall_us,
        "per_op": {k: v / wall_us for k, v in sorted(per.items(), key=lambda kv: -kv[1])},
    }


def time_backends(
    cfg: TrainConfig, data, steps: int = 10, warmup: int = 3, profile: bool = True, profile_steps: int = 3
) -> Dict[str, Dict]:
    """Tokens/s and s/step of training steps on the fused (``auto``) and the reference backend,
    same data, same model init: after ``warmup`` steps each, ``steps`` steps each timed one by one,
    the two backends interleaved step by step (a busy machine disturbs both alike); s/step is the
    median. For the fused backend also the share of the step time spent in the fused ops
    (``fused_op_share``, profiled after the timed steps)."""
    out: Dict[str, Dict] = {}
    trainers: Dict[str, Trainer] = {}
    times: Dict[str, List[float]] = {}
    tokens: Dict[str, int] = {}
    # the timing trainers never write (no run(), no save()); their --out is a fresh temporary directory
    with tempfile.TemporaryDirectory(prefix="unif2ace-speed-") as tmp:
        for name, be in (("fused", "auto"), ("reference", "reference")):
            c = TrainConfig(**{**cfg.to_dict(), "backend": be, "progress": False, "out": os.path.join(tmp, name)})
            try:
                tr = Trainer(c, dataset=data, log=lambda *a: None)
                for _ in range(warmup):
                    tr.train_step()
                trainers[name], times[name], tokens[name] = tr, [], 0
            except Exception as e:  # a broken fused op must not sink the demo
                out[name] = {"backend": be, "error": f"{type(e).__name__}: {e}"}
        for _ in range(steps):
            for name in list(trainers):
                try:
                    t0 = time.perf_counter()
                    tokens[name] += trainers[name].train_step()["tokens"]
                    times[name].append(time.perf_counter() - t0)
                except Exception as e:
                    out[name] = {"backend": trainers.pop(name).cfg.backend, "error": f"{type(e).__name__}: {e}"}
        for name, tr in trainers.items():
            med = float(np.median(times[name]))
            out[name] = {
                "backend": tr.cfg.backend,
                "tokens_per_s": tokens[name] / steps / med,
                "s_per_step": med,
                "steps": steps,
            }
            if profile and name == "fused":
                try:
                    out[name]["fused_op_share"] = _fused_op_share(tr, profile_steps)
                except Exception as e:  # the profiler is a nicety
                    out[name]["fused_op_share_error"] = f"{type(e).__name__}: {e}"
    return {k: out[k] for k in ("fused", "reference") if k in out}


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


def estimate_seconds(s_per_step: float, steps: int, n_gen: int, n_questions: int) -> Dict[str, float]:
    """The printed time estimate: training ``steps`` at ``s_per_step``, and the evaluation in
    training-step equivalents (generation with guidance, questions) plus a fixed part."""
    train = steps * s_per_step
    evaluation = (n_gen * _EVAL_STEPS_PER_FACE + n_questions * _EVAL_STEPS_PER_QUESTION) * s_per_step + _EVAL_FIXED_S
    return {"train_s": train, "eval_s": evaluation}


def run_kernel_benchmark(out_json: str, time_limit: float = 90.0, log=print) -> Optional[Dict]:
    """``python benchmarks/run.py --quick --device cpu --no-peers --no-limits`` (the repository's
    benchmark runner, when the package runs from a checkout; our backends only) into ``out_json``;
    returns {"records", "seconds", "command"} or None."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    runner = os.path.join(root, "benchmarks", "run.py")
    if not os.path.isfile(runner):
        log("[demo] no benchmarks/run.py next to the package (not a checkout): no kernel speed table")
        return None
    t0 = time.perf_counter()
    cmd = [sys.executable, runner, "--quick", "--device", "cpu", "--no-peers", "--no-limits"]
    cmd += ["--json", out_json, "--time-limit", str(time_limit)]
    try:
        subprocess.run(cmd, cwd=root, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
        with open(out_json) as f:
            records = json.load(f)
    except (OSError, ValueError, subprocess.TimeoutExpired) as e:
        log(f"[demo] the quick kernel benchmark failed ({type(e).__name__}: {e}); no kernel speed table")
        return None
    shown = ["python", os.path.relpath(runner, root), *cmd[2:]]  # as typed in the checkout's root
    return {"records": records, "seconds": time.perf_counter() - t0, "command": " ".join(shown)}


def samples_picture(
    truth: np.ndarray,
    generated: np.ndarray,
    attrs: Sequence[Dict[str, str]],
    read_back: Sequence[Dict[str, str]],
    *,
    cols: int = 4,
    scale: int = 4,
) -> np.ndarray:
    """Pairs (true render | generated face) with the caption under each pair, every attribute's
    words in green when the generated face shows it (read back by the decoder), red when not."""
    n, h, w, _ = truth.shape
    pad, gap = 6, 2
    pair_w = 2 * w * scale + gap
    chars = (pair_w + 1) // text_width("x")
    lines_per = 3
    line_h = GLYPH_H + 3
    cell_h = h * scale + 4 + lines_per * line_h + 6
    rows = (n + cols - 1) // cols
    head = 16
    img = np.full((head + rows * cell_h + pad, cols * (pair_w + pad) + pad, 3), 255, dtype=np.uint8)
    draw_text(
        img, pad, 4, "left: true render   right: generated from the caption   green: read back right   red: wrong"
    )
    for i in range(n):
        r, c = divmod(i, cols)
        x0, y0 = pad + c * (pair_w + pad), head + r * cell_h
        for j, im in enumerate((truth[i], generated[i])):
            x = x0 + j * (w * scale + gap)
            img[y0 : y0 + h * scale, x : x + w * scale] = im.repeat(scale, 0).repeat(scale, 1)
        line, x, y = 0, x0, y0 + h * scale + 4
        for words, a in faces.caption_chunks(attrs[i]):
            text = " ".join(words)
            if x > x0 and (x - x0) // text_width("x") + len(text) > chars:
                line += 1
                x, y = x0, y + line_h
                if line >= lines_per:
                    break
            ok = read_back[i].get(a) == attrs[i][a]
            x = draw_text(img, x, y, text, (20, 130, 40) if ok else (210, 30, 30)) + text_width(" ")
    return img


def run_demo(
    out: str = "results/demo",
    *,
    steps: int = DEMO_STEPS,
    n_gen: int = N_GEN,
    n_vqa_images: int = N_VQA_IMAGES,
    questions_per_image: int = QUESTIONS_PER_IMAGE,
    seed: int = 0,
    threads: int = 0,
    progress: bool = True,
    overwrite: bool = False,
    benchmark: bool = True,
    timing_steps: int = 10,
    setup_seconds: Optional[float] = None,
    model_overrides: Optional[Dict] = None,
    train_overrides: Optional[Dict] = None,
    log=print,
) -> Dict:
    """Train, evaluate, report (see the module docstring); returns the report dict (``report.json``).

    ``steps``: training steps (fixed: the result does not depend on the machine's speed);
    ``benchmark``: run the quick kernel benchmark for the report; ``timing_steps``: training steps
    timed per backend (after 3 warm-up steps) for the speed table and the estimate; ``setup_seconds``: the time the
    caller spent setting up (``scripts/demo.sh``), added to the reported total;
    ``model_overrides`` / ``train_overrides``: merged into the demo's model / training config (tests
    use a smaller model and data set)."""
    from .evaluate import eval_generation, eval_vqa, load_run

    t_all, load_start = time.perf_counter(), _load_average()
    replace = check_demo_out(out, overwrite, log)
    os.makedirs(out, exist_ok=True)
    run_dir = os.path.join(out, "run")
    if threads:
        torch.set_num_threads(threads)
    cfg = demo_config(run_dir, steps=steps, seed=seed, threads=threads, progress=progress, **(train_overrides or {}))
    if model_overrides:
        cfg.model = {**cfg.model, **model_overrides}
        cfg.validate()
    from unif2ace.data.shards import TokenDataset
    from unif2ace.data.synthetic import SyntheticSpec, build_synthetic, held_out_split

    t0 = time.perf_counter()
    data_path = build_synthetic(
        SyntheticSpec(num_images=cfg.synthetic_images, num_codes=cfg.model_config().codebook_size), verbose=True
    )
    data_s = time.perf_counter() - t0
    cfg.data = data_path
    n_questions = n_vqa_images * questions_per_image
    log("[demo] timing training steps, fused vs reference ops ...")
    t0 = time.perf_counter()
    speed = time_backends(
        cfg,
        TokenDataset(data_path),
        steps=timing_steps,
        warmup=min(3, timing_steps),
        profile_steps=min(3, timing_steps),
    )
    speed_s = time.perf_counter() - t0
    per_step = speed.get("fused", {}).get("s_per_step") or speed.get("reference", {}).get("s_per_step")
    estimate = estimate_seconds(per_step, cfg.steps, n_gen, n_questions) if per_step else None
    if estimate:
        log(
            f"[demo] estimate from the timed steps ({per_step:.3f} s/step): training {cfg.steps} steps "
            f"~{estimate['train_s'] / 60:.1f} min, evaluation ~{estimate['eval_s'] / 60:.1f} min"
            + (f", kernel benchmark ~{_BENCHMARK_S / 60:.1f} min" if benchmark else "")
        )
    log(
        f"[demo] training preset '{cfg.preset}' with {cfg.model} on the synthetic face set, {cfg.steps} steps, "
        f"batch {cfg.global_batch}, seed {cfg.seed}, device {'cuda' if torch.cuda.is_available() else 'cpu'}"
    )
    t0 = time.perf_counter()
    summary = _train_with_fallback(cfg, log, replace)
    train_s = time.perf_counter() - t0
    log(
        f"[demo] trained {summary['steps']} steps in {summary['wall_s']:.0f} s "
        f"({summary['tokens_per_s']:.0f} tokens/s), final loss {summary['final_loss']:.3f}"
    )

    t_eval = time.perf_counter()
    run = load_run(run_dir, backend="auto" if summary["backend"] == "auto" else "reference")
    decoder = faces.AttributeDecoder(roundtrip=run.vq.roundtrip)
    gen_attrs = held_out_split(n_gen, seed=1001)
    t0 = time.perf_counter()
    gen = eval_generation(run, gen_attrs, decoder, seed=seed)
    gen_s = time.perf_counter() - t0
    log(
        f"[demo] generated {n_gen} faces in {gen_s:.1f} s: attribute accuracy {gen['accuracy']:.1%} "
        f"(chance {gen['chance']:.1%}), all 12 right in {gen['all_attributes_correct']:.1%}"
    )
    # the tokenizer + decoder ceiling: attributes read back from VQ round trips of the true renders
    truth_imgs = faces.render_batch(gen_attrs)
    ceil_pred = decoder.predict(run.vq.roundtrip(truth_imgs))
    ceiling = float(np.mean([[p[a] == t[a] for a in faces.ATTRIBUTES] for p, t in zip(ceil_pred, gen_attrs)]))
    k = min(SAMPLES_SHOWN, n_gen)
    write_png(
        os.path.join(out, "samples.png"),
        samples_picture(truth_imgs[:k], gen["images"][:k], gen_attrs[:k], gen["predicted"][:k]),
    )
    t0 = time.perf_counter()
    vqa = eval_vqa(run, held_out_split(n_vqa_images, seed=2002), per_image=questions_per_image, seed=seed)
    vqa_s = time.perf_counter() - t0
    log(
        f"[demo] answered {vqa['n']} held-out questions in {vqa_s:.1f} s: accuracy {vqa['accuracy']:.1%} "
        f"(chance {vqa['chance']:.1%})"
    )
    eval_s = time.perf_counter() - t_eval
    shutil.copy(os.path.join(run_dir, "loss_curve.png"), os.path.join(out, "loss_curve.png"))
    kernels = None
    if benchmark:
        log("[demo] quick kernel benchmark (benchmarks/run.py --quick --device cpu --no-peers --no-limits) ...")
        kernels = run_kernel_benchmark(os.path.join(out, "kernels.json"), time_limit=_BENCHMARK_S - 10, log=log)
    total_s = time.perf_counter() - t_all
    ru_self, ru_children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = ru_self.ru_utime + ru_self.ru_stime + ru_children.ru_utime + ru_children.ru_stime
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": _machine(),
        "cpu_threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "model": {"preset": cfg.preset, "overrides": cfg.model, "parameters": run.model.num_parameters()},
        "training": {k: v for k, v in summary.items() if k != "history"}
        | {
            "train_s": train_s,
            "global_batch": cfg.global_batch,
            "lr": cfg.lr,
            "seed": cfg.seed,
            "image_embedding_init": cfg.image_embedding_init,
        },
        "generation": {k: gen[k] for k in ("accuracy", "per_attribute", "chance", "all_attributes_correct", "n")}
        | {
            "decoder_ceiling": ceiling,
            "seconds": gen_s,
            "guidance": run.model.cfg.guidance_scale,
            "temperature": run.model.cfg.temperature,
            "steps": run.model.cfg.gen_steps,
            "examples": [{"caption": c, "read_back": p} for c, p in zip(gen["captions"][:6], gen["predicted"][:6])],
        },
        "vqa": {k: vqa[k] for k in ("accuracy", "per_attribute", "chance", "n", "examples")} | {"seconds": vqa_s},
        "speed": speed,
        "kernels": kernels,
        "timing": {
            "setup_s": setup_seconds,
            "data_s": data_s,
            "speed_s": speed_s,
            "train_s": train_s,
            "eval_s": eval_s,
            "benchmark_s": kernels["seconds"] if kernels else None,
            "estimate": estimate,
            "cpu_s": cpu_s,
            "load_average_start": load_start,
            "load_average_end": _load_average(),
            "logical_cpus": os.cpu_count(),
        },
        "total_s": total_s + (setup_seconds or 0.0),
    }
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(render_markdown(report))
    log(f"[demo] done in {report['total_s']:.0f} s; report: {os.path.join(out, 'report.md')}")
    return report


def _load_average() -> Optional[List[float]]:
    """The 1-, 5- and 15-minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _machine() -> str:
    """The CPU model name (``/proc/cpuinfo``), else what :mod:`platform` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} logical CPUs"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs"


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _kernel_rows(records: List[Dict]) -> List[str]:
    """One table row per (op, case, mode): reference ms, cpu ms, speedup."""
    by: Dict[tuple, Dict[str, Dict]] = {}
    for r in records:
        if r.get("status") == "ok":
            by.setdefault((r["op"], r["case"], r["mode"]), {})[r["backend"]] = r
    rows = []
    for (op, case, mode), impls in by.items():
        ref, cpu = impls.get("reference"), impls.get("cpu")
        if ref is None or cpu is None:
            continue
        rows.append(
            f"| {op} | {case} | {mode} | {ref['median_ms']:.3f} | {cpu['median_ms']:.3f} | "
            f"{ref['median_ms'] / cpu['median_ms']:.2f}x |"
        )
    return rows


def render_markdown(r: Dict) -> str:
    tr, g, v, sp, tm = r["training"], r["generation"], r["vqa"], r["speed"], r["timing"]
    all12_chance = float(np.prod([1 / len(v_) for v_ in faces.ATTRIBUTES.values()]))
    lines = [
        "# unif2ace demo report",
        "",
        f"{r['date']} · {r['machine']} · {r['device']} ({r['cpu_threads']} threads) · torch {r['torch']} · "
        f"model `{r['model']['preset']}` + {r['model']['overrides']} ({r['model']['parameters']:,} parameters)",
        "",
        "## Results (held-out attribute combinations, never seen in training)",
        "",
        "| metric | result | chance |",
        "|---|---|---|",
        f"| attributes read back from generated faces ({g['n']} faces x 12 attributes) | **{_pct(g['accuracy'])}** "
        f"| {_pct(g['chance'])} |",
        f"| generated faces with all 12 attributes right | **{_pct(g['all_attributes_correct'])}** "
        f"| {100 * all12_chance:.4f}% |",
        f"| VQA answers ({v['n']} questions, greedy) | **{_pct(v['accuracy'])}** | {_pct(v['chance'])} |",
        "| decoder ceiling (attributes read back from VQ round trips of the true renders) "
        f"| {_pct(g['decoder_ceiling'])} | |",
        "",
        f"Generation: {g['steps']} MaskGIT steps, guidance {g['guidance']}, temperature {g['temperature']}. "
        "`samples.png`: the first pairs (true render | generated face) with the caption under each pair; an "
        "attribute's words are green when the decoder reads it back from the generated face, red when not.",
        "",
        "![samples](samples.png)",
        "",
        "| attribute | generation | VQA |",
        "|---|---|---|",
    ]
    for a in faces.ATTRIBUTES:
        lines.append(f"| {a} | {_pct(g['per_attribute'].get(a))} | {_pct(v['per_attribute'].get(a))} |")
    lines += [
        "",
        "## Training",
        "",
        f"- {tr['steps']} steps, fixed (global batch {tr['global_batch']}, AdamW lr {tr['lr']}, warmup + cosine, "
        f"seed {tr['seed']}, image-code embeddings initialised `{tr.get('image_embedding_init', 'random')}`) in "
        f"{tr['wall_s']:.0f} s on backend `{tr['backend']}`; {tr['tokens_per_s']:.0f} tokens/s; "
        f"final loss {tr['final_loss']:.3f}",
        "- loss curves: `loss_curve.png` (log scale; total, MMU answer CE, D3Diff, mask CE)",
        "",
        "![loss curves](loss_curve.png)",
        "",
        "## Training speed, fused vs reference ops (same machine, back to back)",
        "",
        "| backend | tokens/s | s/step |",
        "|---|---|---|",
    ]
    for name, s in sp.items():
        if "error" in s:
            lines.append(f"| {name} | failed: {s['error']} | |")
        else:
            lines.append(f"| {name} (`{s['backend']}`) | {s['tokens_per_s']:.0f} | {s['s_per_step']:.3f} |")
    share = sp.get("fused", {}).get("fused_op_share")
    if share:
        top = ", ".join(f"`{k.split('::')[-1]}` {_pct(x)}" for k, x in list(share["per_op"].items())[:6])
        lines += [
            "",
            f"Share of a fused training step spent in the fused ops (profiler): **{_pct(share['share'])}** ({top}).",
        ]
    k = r.get("kernels")
    if k:
        rows = _kernel_rows(k["records"])
        lines += [
            "",
            f"## Kernel speed, quick benchmark on this machine (`{k['command']}`, {k['seconds']:.0f} s)",
            "",
            "| op | case | mode | reference ms | cpu ms | speedup |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    lines += ["", "## Examples", ""]
    for e in v["examples"][:8]:
        lines.append(f"- Q: {e['question']} → `{e['answer']}` (truth `{e['truth']}`)")
    est = tm.get("estimate") or {}
    parts = [
        ("setup (scripts/bootstrap.sh)", tm.get("setup_s")),
        ("data + tokenizer", tm.get("data_s")),
        ("speed timing", tm.get("speed_s")),
        ("training", tm.get("train_s")),
        ("evaluation", tm.get("eval_s")),
        ("kernel benchmark", tm.get("benchmark_s")),
    ]
    lines += [
        "",
        "## Time",
        "",
        " · ".join(f"{n} {s:.0f} s" for n, s in parts if s is not None)
        + f" · **total {r['total_s']:.0f} s**"
        + (f" (estimated up front: training {est['train_s']:.0f} s, evaluation {est['eval_s']:.0f} s)" if est else ""),
        "",
    ]
    if tm.get("cpu_s") is not None:
        lines += [
            f"CPU time of the demo process and its children (the benchmark): {tm['cpu_s']:.0f} s "
            f"(setup not included) on {tm.get('logical_cpus')} logical CPUs.",
            "",
        ]
    ls, le = tm.get("load_average_start"), tm.get("load_average_end")
    if ls and le:
        busy = max(ls[0], le[0], le[2]) > 1.5 * (tm.get("logical_cpus") or 1)
        lines += [
            f"Load average (1, 5, 15 min) at the start {ls}, at the end {le}"
            + (
                ": the machine was shared with other work; the wall times overstate a quiet machine's." if busy else "."
            ),
            "",
        ]
    return "\n".join(lines)
