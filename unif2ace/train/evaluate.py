"""Loading a trained run, generating faces, answering questions, and the synthetic-set evaluations.

A *run* is a training output directory (``model.safetensors`` or ``checkpoints/``, plus
``data.json`` naming the data and its tokenizers) or a bare ``.safetensors`` file.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from unif2ace.data import faces

__all__ = ["Run", "load_run", "generate_faces", "eval_generation", "eval_vqa"]


@dataclass
class Run:
    model: "torch.nn.Module"
    tokenizer: Optional[object]  # WordTokenizer or None (then text is given as ids)
    vq: Optional[object]  # PatchVQ or None (then images are code grids)

    def encode_text(self, text) -> List[int]:
        if isinstance(text, str):
            if self.tokenizer is None:
                raise ValueError("this run has no text tokenizer; pass token ids")
            return self.tokenizer.encode(text)
        return [int(t) for t in text]


def load_run(path: str, device="cpu", backend: str = "auto", log=None) -> Run:
    """A run directory (its ``model.safetensors``, else its newest good training checkpoint, falling
    back past damaged ones), a ``.safetensors`` file, or a training checkpoint (file, or a sharded
    ``--fsdp`` checkpoint directory)."""
    from unif2ace.kernels import BACKENDS, backend_usable
    from unif2ace.model import load_checkpoint

    from .checkpoint import NAME_RE, checkpoint_candidates, find_good_checkpoint, load_training_checkpoint

    if backend not in ("auto", "reference"):
        if backend not in BACKENDS:
            raise ValueError(f"load_run: backend must be 'auto' or one of {list(BACKENDS)}, got {backend!r}")
        ok, why = backend_usable(backend, torch.device(device))
        if not ok:
            raise ValueError(f"backend {backend!r} cannot run on {torch.device(device).type}: {why}")
    if log is None:
        import sys

        def log(msg):
            print(msg, file=sys.stderr)

    def owner(p):  # RUN/checkpoints/step-N[.pt] -> RUN (where data.json lives)
        d = os.path.dirname(os.path.abspath(p))
        return os.path.dirname(d) if os.path.basename(d) == "checkpoints" else d

    run_dir = owner(path)
    if os.path.isdir(path) and NAME_RE.fullmatch(os.path.basename(os.path.normpath(path))):
        model = _model_from_sharded(path)
    elif os.path.isdir(path):
        run_dir = path
        st_path = os.path.join(path, "model.safetensors")
        paths, problems = checkpoint_candidates(path)
        if os.path.isfile(st_path):
            model = load_checkpoint(st_path)
        elif not paths and not problems:
            raise ValueError(f"load_run: {path!r} has neither model.safetensors nor checkpoints/")
        elif any(os.path.isdir(p) for p in paths):
            model = find_good_checkpoint(path, _model_from_sharded, log)[1]
        else:
            model = _model_from_state(load_training_checkpoint(path, log=log))
    elif path.endswith(".safetensors"):
        model = load_checkpoint(path)
    elif path.endswith(".pt"):
        model = _model_from_state(load_training_checkpoint(path))
    else:
        raise ValueError(f"load_run: {path!r} is not a run directory, .safetensors or .pt checkpoint")
    model = model.to(device).eval().set_backend(backend)
    tok = vq = None
    meta_path = os.path.join(run_dir, "data.json")
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta = json.load(f).get("meta", {})
        from unif2ace.data.tokenizers import WordTokenizer

        if isinstance(meta.get("tokenizer"), dict) and meta["tokenizer"].get("type") == "word":
            tok = WordTokenizer(meta["tokenizer"]["words"])
        from unif2ace.data.synthetic import vq_from_meta

        vq = vq_from_meta(meta)
    return Run(model, tok, vq)


def _model_from_state(st):
    from unif2ace.model import UniF2ace, UniF2aceConfig

    model = UniF2ace(UniF2aceConfig.from_json(st["model_config"]))
    model.load_state_dict(st["model"])
    return model


def _model_from_sharded(path: str):
    """A model from a sharded (``--fsdp``) checkpoint, read in this one process (no process group)."""
    import torch.distributed.checkpoint as dcp

    from unif2ace.model import UniF2ace, UniF2aceConfig

    from .fsdp import verify_sharded

    st = verify_sharded(path)
    model = UniF2ace(UniF2aceConfig.from_json(st["model_config"]))
    sd = {"model": model.state_dict()}
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process": yes
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(sd, checkpoint_id=path, no_dist=True)
    model.load_state_dict(sd["model"])
    return model


def generate_faces(run: Run, captions: Sequence, *, seed: int = 0, batch: int = 32, **settings):
    """Captions (strings or id lists) -> (codes ``[N, L]``, images ``[N, H, W, 3]`` uint8 or None).

    ``settings``: the sampling settings of :func:`unif2ace.model.generate.generate_images` (the
    fields of its ``GenerationSettings``: steps, guidance, temperature, confidence_noise, ...); a
    setting left out or None defaults to the model config's generation field."""
    steps = settings.get("steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"generate_faces: argument 'steps' must be an int >= 1, got {steps!r}")
    ids = [run.encode_text(c) for c in captions]
    out = []
    for i in range(0, len(ids), batch):
        out.append(run.model.generate_images(ids[i : i + batch], seed=seed + i, **settings).cpu())
    codes = torch.cat(out).numpy()
    imgs = run.vq.decode(codes) if run.vq is not None else None
    return codes, imgs


def eval_generation(
    run: Run,
    attrs: List[Dict[str, str]],
    decoder: "faces.AttributeDecoder",
    *,
    seed: int = 0,
    **settings,
) -> Dict:
    """Generate from full held-out captions, read attributes back, compare with the caption.
    ``settings``: the sampling keywords of :func:`generate_faces`."""
    caps = [" ".join(faces.caption(a, full=True)[0]) for a in attrs]
    codes, imgs = generate_faces(run, caps, seed=seed, **settings)
    pred = decoder.predict(imgs)
    per = {a: float(np.mean([p[a] == t[a] for p, t in zip(pred, attrs)])) for a in faces.ATTRIBUTES}
    exact = float(np.mean([all(p[a] == t[a] for a in faces.ATTRIBUTES) for p, t in zip(pred, attrs)]))
    return {
        "accuracy": float(np.mean(list(per.values()))),
        "per_attribute": per,
        "chance": faces.chance_accuracy(list(faces.ATTRIBUTES)),
        "all_attributes_correct": exact,
        "n": len(attrs),
        "captions": caps,
        "images": imgs,
        "predicted": pred,
    }


def eval_vqa(run: Run, attrs: List[Dict[str, str]], *, per_image: int = 3, seed: int = 0) -> Dict:
    """Ask ``per_image`` held-out questions about each face's VQ-encoded render; greedy answers."""
    rng = np.random.default_rng(seed)
    imgs = np.stack([faces.render(a) for a in attrs])
    codes = torch.from_numpy(run.vq.encode(imgs))
    rows, qs, truth, which = [], [], [], []
    for i, a in enumerate(attrs):
        for name, q, ans in faces.vqa_pairs(a, rng, per_image):
            rows.append(i), qs.append(run.tokenizer.encode(q)), truth.append(ans), which.append((name, " ".join(q)))
    answers = []
    for s in range(0, len(rows), 64):
        sel = rows[s : s + 64]
        answers += run.model.answer(codes[sel], qs[s : s + 64], max_new_tokens=3, temperature=0.0)
    said = [run.tokenizer.decode(x) for x in answers]
    ok = [s == t for s, t in zip(said, truth)]
    per: Dict[str, List[bool]] = {}
    for (name, _), o in zip(which, ok):
        per.setdefault(name, []).append(o)
    return {
        "accuracy": float(np.mean(ok)),
        "per_attribute": {k: float(np.mean(v)) for k, v in per.items()},
        "chance": faces.chance_accuracy([n for n, _ in which]),
        "n": len(ok),
        "examples": [{"question": q, "truth": t, "answer": s} for (_, q), t, s in list(zip(which, truth, said))[:12]],
    }
