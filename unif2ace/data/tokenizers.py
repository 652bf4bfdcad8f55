"""Tokenizers for the synthetic face set.

:class:`WordTokenizer`: a fixed word list -> ids ``0..n-1`` (``<unk>`` is id 0); the model's bos/eos
ids are separate (config fields). :class:`PatchVQ`: a patch codebook image tokenizer: an image
``[H, W, 3]`` uint8 is cut into ``p x p`` patches, each patch is replaced by the index of its nearest
codebook entry (k-means centroids in RGB space), giving a ``(H/p) x (W/p)`` code grid; decoding
pastes the centroids back. :func:`fitted_vq` fits it with k-means on renders of the synthetic set
and caches the codebook under ``.cache/`` (keyed by every fitting parameter).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import List, Optional, Sequence

import numpy as np
import torch

__all__ = ["WordTokenizer", "PatchVQ", "fitted_vq", "default_cache_dir"]


class WordTokenizer:
    """Whitespace word tokenizer over a fixed vocabulary; unknown words map to ``<unk>`` (id 0)."""

    UNK = "<unk>"

    def __init__(self, words: Sequence[str]):
        words = [self.UNK] + [w for w in words if w != self.UNK]
        if len(set(words)) != len(words):
            raise ValueError("WordTokenizer: argument 'words' has duplicates")
        self.words = words
        self.ids = {w: i for i, w in enumerate(words)}

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text) -> List[int]:
        toks = text.split() if isinstance(text, str) else list(text)
        return [self.ids.get(w.lower(), 0) for w in toks]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.words[i] if 0 <= i < len(self.words) else self.UNK for i in ids)

    def to_json(self) -> str:
        return json.dumps({"type": "word", "words": self.words})

    @classmethod
    def from_json(cls, text: str) -> "WordTokenizer":
        d = json.loads(text)
        if d.get("type") != "word" or not isinstance(d.get("words"), list):
            raise ValueError("WordTokenizer.from_json: not a word tokenizer description")
        return cls(d["words"])


class PatchVQ:
    """Patch codebook VQ. ``codebook [K, p*p*3]`` float32 in [0, 255]."""

    def __init__(self, codebook: np.ndarray, patch: int):
        codebook = np.asarray(codebook, dtype=np.float32)
        if codebook.ndim != 2 or codebook.shape[1] != patch * patch * 3:
            raise ValueError(
                f"PatchVQ: codebook must be [K, {patch * patch * 3}] for patch={patch}, got {list(codebook.shape)}"
            )
        self.codebook = codebook
        self.patch = patch

    @property
    def num_codes(self) -> int:
        return self.codebook.shape[0]

    def _patches(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        N, H, W, C = images.shape
        p = self.patch
        if C != 3 or H % p or W % p:
            raise ValueError(
                f"PatchVQ: images must be [N, H, W, 3] with H, W multiples of {p}, got {list(images.shape)}"
            )
        x = images.reshape(N, H // p, p, W // p, p, 3).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(N, (H // p) * (W // p), p * p * 3).astype(np.float32)

    def encode(self, images: np.ndarray) -> np.ndarray:
        """``[N, H, W, 3]`` uint8 -> codes ``[N, (H/p)*(W/p)]`` int64 (row-major grid)."""
        x = self._patches(images)
        N, L, D = x.shape
        # images share most of their patches: find the nearest code of each distinct patch once
        flat = np.ascontiguousarray(x.reshape(N * L, D))
        _, first, inverse = np.unique(flat.view(np.dtype((np.void, D * 4))), return_index=True, return_inverse=True)
        d = torch.cdist(torch.from_numpy(flat[first]), torch.from_numpy(self.codebook))
        return d.argmin(1).numpy().astype(np.int64)[inverse.reshape(-1)].reshape(N, L)

    def decode(self, codes, grid: Optional[int] = None) -> np.ndarray:
        """codes ``[N, L]`` (L a square) -> ``[N, H, W, 3]`` uint8."""
        codes = np.asarray(codes, dtype=np.int64)
        if codes.ndim == 1:
            codes = codes[None]
        N, L = codes.shape
        g = grid or int(round(L**0.5))
        if g * g != L:
            raise ValueError(f"PatchVQ.decode: {L} codes do not form a square grid")
        if codes.min() < 0 or codes.max() >= self.num_codes:
            raise ValueError(f"PatchVQ.decode: codes must be in [0, {self.num_codes})")
        p = self.patch
        x = self.codebook[codes].reshape(N, g, g, p, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(N, g * p, g * p, 3)
        return np.clip(np.rint(x), 0, 255).astype(np.uint8)

    def roundtrip(self, images: np.ndarray) -> np.ndarray:
        return self.decode(self.encode(images))

    @classmethod
    def fit(cls, images: np.ndarray, num_codes: int, patch: int, *, iters: int = 25, seed: int = 0) -> "PatchVQ":
        """k-means (k-means++ init, Lloyd iterations) on the distinct patches of ``images``."""
        x = cls(np.zeros((1, patch * patch * 3), np.float32), patch)._patches(images).reshape(-1, patch * patch * 3)
        x, counts = np.unique(x, axis=0, return_counts=True)  # weighted k-means over distinct patches
        X = torch.from_numpy(x).double()
        w = torch.from_numpy(counts).double()
        g = torch.Generator().manual_seed(seed)
        K = min(num_codes, len(X))
        # k-means++ seeding
        idx = [int(torch.multinomial(w, 1, generator=g))]
        d2 = ((X - X[idx[0]]) ** 2).sum(1)
        for _ in range(1, K):
            p = (d2 * w).clamp_min(0)
            j = (
                int(torch.multinomial(p / p.sum(), 1, generator=g))
                if float(p.sum()) > 0
                else int(torch.randint(len(X), (1,), generator=g))
            )
            idx.append(j)
            d2 = torch.minimum(d2, ((X - X[j]) ** 2).sum(1))
        C = X[idx].clone()
        for _ in range(iters):
            a = torch.cdist(X, C).argmin(1)
            tot = torch.zeros_like(C).index_add_(0, a, X * w[:, None])
            cnt = torch.zeros(K, dtype=X.dtype).index_add_(0, a, w)
            keep = cnt > 0
            C[keep] = tot[keep] / cnt[keep, None]
        cb = C.float().numpy()
        if K < num_codes:  # fewer distinct patches than codes: pad with copies (never chosen twice)
            cb = np.concatenate([cb, np.repeat(cb[:1], num_codes - K, 0)])
        return cls(cb, patch)

    def save(self, path) -> None:
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            np.savez(f, codebook=self.codebook, patch=np.int64(self.patch))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path) -> "PatchVQ":
        try:
            with np.load(path) as z:
                return cls(z["codebook"], int(z["patch"]))
        except (OSError, KeyError, ValueError) as e:
            raise ValueError(f"PatchVQ.load: {path} is not a PatchVQ codebook file: {e}") from None


def default_cache_dir() -> str:
    """``$UNIF2ACE_CACHE`` or ``<repo or cwd>/.cache/unif2ace``."""
    env = os.environ.get("UNIF2ACE_CACHE")
    if env:
        return env
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    base = here if os.path.exists(os.path.join(here, "setup.py")) else os.getcwd()
    return os.path.join(base, ".cache", "unif2ace")


def fitted_vq(
    num_codes: int = 64,
    patch: int = 4,
    *,
    size: int = 32,
    num_images: int = 1500,
    seed: int = 0,
    cache_dir: Optional[str] = None,
    verbose: bool = False,
) -> PatchVQ:
    """The synthetic set's patch VQ: fitted on ``num_images`` renders on first use, then loaded from
    the cache file (the file name hashes every parameter and the renderer's source)."""
    from . import faces

    src = open(faces.__file__, "rb").read()
    key = hashlib.sha256(repr((num_codes, patch, size, num_images, seed)).encode() + src).hexdigest()[:16]
    cache_dir = cache_dir or default_cache_dir()
    path = os.path.join(cache_dir, f"patchvq-{num_codes}x{patch}-{key}.npz")
    if os.path.exists(path):
        try:
            return PatchVQ.load(path)
        except ValueError:
            pass  # a damaged cache entry is refitted below
    rng = np.random.default_rng(seed)
    imgs = np.stack([faces.render(faces.sample_attributes(rng), size) for _ in range(num_images)])
    if verbose:
        print(f"fitting the patch VQ ({num_codes} codes, {patch}x{patch} patches) on {num_images} renders ...")
    vq = PatchVQ.fit(imgs, num_codes, patch, seed=seed)
    os.makedirs(cache_dir, exist_ok=True)
    vq.save(path)
    return vq
