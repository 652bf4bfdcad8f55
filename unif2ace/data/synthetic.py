"""The synthetic face set as a pre-tokenized dataset, plus its held-out evaluation split.

:func:`build_synthetic` renders ``num_images`` training faces (held-out combinations excluded),
encodes them with the patch VQ, and writes ``captions_per_image`` captions and ``vqa_per_image``
VQA pairs per image in the shard format (:mod:`.shards`). The directory is cached: a second call
with the same arguments returns it without work. :func:`held_out_split` draws faces whose
attribute combinations never occur in training.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from . import faces
from .shards import ShardWriter, TokenDataset
from .tokenizers import PatchVQ, WordTokenizer, default_cache_dir, fitted_vq

__all__ = ["SyntheticSpec", "text_tokenizer", "build_synthetic", "held_out_split", "synthetic_vq", "vq_from_meta"]


SOURCE = "unif2ace synthetic faces"  # meta["source"] of the synthetic set


@dataclass
class SyntheticSpec:
    num_images: int = 6000
    captions_per_image: int = 2
    # 3 questions per image (60% of the records are VQA pairs): with 2, VQA stays near chance on the
    # small attributes (brows, expression, earrings) after the demo's 1200 steps (README.md, Demo recipe)
    vqa_per_image: int = 3
    caption_order: str = "canonical"  # "canonical" (faces.ATTRIBUTES order) | "random" (faces.caption)
    seed: int = 0
    num_codes: int = 64
    patch: int = 4
    size: int = faces.IMAGE_SIZE
    held_out_fraction: float = 0.1

    def validate(self):
        for f in ("num_images", "num_codes", "patch", "size"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"SyntheticSpec: field '{f}' must be an int >= 1, got {v!r}")
        for f in ("captions_per_image", "vqa_per_image"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"SyntheticSpec: field '{f}' must be an int >= 0, got {v!r}")
        if self.captions_per_image + self.vqa_per_image == 0:
            raise ValueError("SyntheticSpec: captions_per_image + vqa_per_image must be >= 1")
        if self.caption_order not in ("canonical", "random"):
            raise ValueError(
                f"SyntheticSpec: field 'caption_order' must be 'canonical' or 'random', got {self.caption_order!r}"
            )
        if self.size % self.patch:
            raise ValueError(f"SyntheticSpec: size={self.size} must be a multiple of patch={self.patch}")
        if not 0.0 < self.held_out_fraction < 1.0:
            raise ValueError(
                f"SyntheticSpec: field 'held_out_fraction' must be in (0, 1), got {self.held_out_fraction}"
            )
        return self

    @property
    def grid(self) -> int:
        return self.size // self.patch


def text_tokenizer() -> WordTokenizer:
    return WordTokenizer(faces.vocabulary())


def synthetic_vq(spec: SyntheticSpec, cache_dir: Optional[str] = None, verbose: bool = False) -> PatchVQ:
    return fitted_vq(spec.num_codes, spec.patch, size=spec.size, cache_dir=cache_dir, verbose=verbose)


def vq_from_meta(meta: Dict) -> Optional[PatchVQ]:
    """The patch VQ a data set's ``meta`` (``index.json`` / ``data.json``) names: the synthetic set's
    fitted VQ, or None for a data set that carries none."""
    if not isinstance(meta, dict) or meta.get("source") != SOURCE or not isinstance(meta.get("spec"), dict):
        return None
    return synthetic_vq(SyntheticSpec(**meta["spec"]))


def _train_attrs(rng, spec):
    while True:
        a = faces.sample_attributes(rng)
        if not faces.is_held_out(a, spec.held_out_fraction):
            return a


def build_synthetic(
    spec: Optional[SyntheticSpec] = None,
    path: Optional[str] = None,
    *,
    cache_dir: Optional[str] = None,
    verbose: bool = False,
) -> str:
    """Write (or reuse) the synthetic training set; returns its directory."""
    spec = (spec or SyntheticSpec()).validate()
    cache_dir = cache_dir or default_cache_dir()
    src = open(faces.__file__, "rb").read() + open(__file__, "rb").read()
    key = hashlib.sha256(json.dumps(spec.__dict__, sort_keys=True).encode() + src).hexdigest()[:16]
    path = path or os.path.join(cache_dir, f"synthetic-{key}")
    if os.path.isfile(os.path.join(path, "index.json")):
        try:
            ds = TokenDataset(path)
            if ds.meta.get("key") == key:
                return path
        except ValueError:
            pass
    vq = synthetic_vq(spec, cache_dir, verbose)
    tok = text_tokenizer()
    rng = np.random.default_rng(spec.seed)
    tmp = path + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    w = ShardWriter(
        tmp,
        image_tokens=spec.grid**2,
        codebook_size=spec.num_codes,
        text_vocab_size=len(tok),
        meta={
            "source": SOURCE,
            "key": key,
            "spec": spec.__dict__,
            "tokenizer": json.loads(tok.to_json()),
            "image_size": spec.size,
            "patch": spec.patch,
        },
    )
    if verbose:
        print(f"rendering and tokenizing {spec.num_images} synthetic faces ...")
    chunk = 512
    for c0 in range(0, spec.num_images, chunk):
        attrs = [_train_attrs(rng, spec) for _ in range(min(chunk, spec.num_images - c0))]
        codes = vq.encode(np.stack([faces.render(a, spec.size) for a in attrs]))
        for a, c in zip(attrs, codes):
            img = w.add_image(c)
            for _ in range(spec.captions_per_image):
                words, _ = faces.caption(a, rng, shuffle=spec.caption_order == "random")
                w.add_caption(img, tok.encode(words))
            for _, q, ans in faces.vqa_pairs(a, rng, spec.vqa_per_image):
                w.add_vqa(img, tok.encode(q), tok.encode([ans]))
    w.close()
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def held_out_split(n: int, seed: int = 777, fraction: float = 0.1) -> List[Dict[str, str]]:
    """``n`` attribute dicts from the held-out combinations (never in a training set built with the
    same ``fraction``)."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        a = faces.sample_attributes(rng)
        if faces.is_held_out(a, fraction):
            out.append(a)
    return out
