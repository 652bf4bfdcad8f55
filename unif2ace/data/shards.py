"""The pre-tokenized on-disk format, its writer and its loader.

A dataset is a directory::

    index.json                 {"format": "unif2ace-tokens", "version": 1, "image_tokens": L,
                                "codebook_size": K, "text_vocab_size": T, "num_records": R,
                                "shards": [{"name": "shard-00000", "images": n, "records": r,
                                            "text_tokens": t}, ...], "meta": {...}}
    shard-00000.codes.npy      [n, L] uint16 (K <= 65536) or int32: image code grids (row-major),
                               from any VQ tokenizer (MAGVIT-v2, the built-in patch VQ, ...)
    shard-00000.records.npy    [r, 6] int64: (kind, image, text_start, text_len, answer_start, answer_len)
                               kind 0 = caption (a t2i sample), 1 = VQA pair (an mmu sample);
                               image indexes this shard's codes; text/answer are spans of .text.npy
                               (answer_len 0 for captions)
    shard-00000.text.npy       [t] int32: concatenated text-token ids (without bos/eos)

Every array is a plain ``.npy`` file, opened memory-mapped (``np.load(mmap_mode="r")``). To train
on your own data, write your tokenizer's outputs with :class:`ShardWriter` (or any program that
writes these files) and point ``unif2ace train --data DIR`` at the directory; the model config's
``image_grid ** 2`` must equal ``image_tokens``, ``codebook_size`` must cover the codes and
``text_vocab_size`` the text ids (``unif2ace train`` checks and says which field differs).

:class:`TokenDataset` maps a global record index to a :class:`unif2ace.model.Sample`.
:class:`EpochSampler` gives the indices of each optimizer step's global batch: a fresh permutation
per epoch (seeded by (seed, epoch)), the last partial batch of an epoch dropped, and the step's
global batch split into per-rank micro-batches like ``DistributedSampler`` (rank r of W takes
micro-batches r, r + W, ...). The data position is a pure function of the step, which makes
resuming exact.
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

__all__ = ["FORMAT", "ShardWriter", "TokenDataset", "EpochSampler", "DataFormatError"]

FORMAT = "unif2ace-tokens"
VERSION = 1


class DataFormatError(ValueError):
    """A dataset directory does not follow the format (the message names the file and field)."""


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
RECORD_FIELDS = ("kind", "image", "text_start", "text_len", "answer_start", "answer_len")


def _count(d: Dict, key: str, lo: int, where: str) -> int:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise DataFormatError(f"TokenDataset: {where}: field {key!r} must be an int >= {lo}, got {v!r}")
    return v


def _check_values(a: np.ndarray, lo: int, hi: int, fp: str, what: str, chunk: int = 1 << 24) -> None:
    """Every value of ``a`` in ``[lo, hi)`` (chunked over the memory map)."""
    flat = a.reshape(-1)
    for i in range(0, flat.shape[0], chunk):
        c = np.asarray(flat[i : i + chunk])
        bad = (c < lo) | (c >= hi)
        if bad.any():
            j = int(np.argmax(bad))
            raise DataFormatError(
                f"TokenDataset: {fp}: {what} {int(c[j])} at flat position {i + j} is outside [{lo}, {hi})"
            )


def _check_records(r: np.ndarray, n_images: int, n_text: int, fp: str) -> None:
    """Every field of every ``(kind, image, text_start, text_len, answer_start, answer_len)`` record."""
    if r.shape[0] == 0:
        return
    kind, img, t0, tn, a0, an = (np.asarray(r[:, k], dtype=np.int64) for k in range(6))
    checks = [
        ("kind", (kind != 0) & (kind != 1), "must be 0 (caption) or 1 (VQA pair)"),
        ("image", (img < 0) | (img >= n_images), f"must index this shard's images [0, {n_images})"),
        ("text_start", (t0 < 0) | (t0 > n_text), f"must be in [0, {n_text}] (the shard's text tokens)"),
        ("text_len", (tn < 0) | (t0 + tn > n_text), f"must be >= 0 with text_start + text_len <= {n_text}"),
        ("answer_start", (a0 < 0) | (a0 > n_text), f"must be in [0, {n_text}] (the shard's text tokens)"),
        ("answer_len", (an < 0) | (a0 + an > n_text), f"must be >= 0 with answer_start + answer_len <= {n_text}"),
        ("answer_len", (kind == 0) & (an != 0), "must be 0 for a caption (kind 0)"),
        ("answer_len", (kind == 1) & (an < 1), "must be >= 1 for a VQA pair (kind 1)"),
    ]
    for field, bad, rule in checks:
        if bad.any():
            j = int(np.argmax(bad))
            rec = [int(v) for v in r[j]]
            raise DataFormatError(
                f"TokenDataset: {fp}: record {j} {rec}: field {field!r} {rule}, got {rec[RECORD_FIELDS.index(field)]}"
            )


class ShardWriter:
    """Write a dataset directory. ``add_image(codes) -> image id``; ``add_caption(image, ids)``;
    ``add_vqa(image, question_ids, answer_ids)``; ``close()`` writes the last shard and index.json.
    Image ids are global (across shards); a shard is cut every ``images_per_shard`` images."""

    def __init__(
        self,
        path: str,
        *,
        image_tokens: int,
        codebook_size: int,
        text_vocab_size: int,
        images_per_shard: int = 4096,
        meta: Optional[Dict] = None,
    ):
        for name, v in (
            ("image_tokens", image_tokens),
            ("codebook_size", codebook_size),
            ("text_vocab_size", text_vocab_size),
            ("images_per_shard", images_per_shard),
        ):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"ShardWriter: argument '{name}' must be an int >= 1, got {v!r}")
        os.makedirs(path, exist_ok=True)
        self.path, self.L, self.K, self.T = path, image_tokens, codebook_size, text_vocab_size
        self.per_shard = images_per_shard
        self.meta = dict(meta or {})
        self.shards: List[Dict] = []
        self._reset()
        self._first = 0  # global id of the current shard's first image
        self.closed = False

    def _reset(self):
        self._codes: List[np.ndarray] = []
        self._records: List[List[int]] = []
        self._text: List[int] = []

    def add_image(self, codes) -> int:
        c = np.asarray(codes, dtype=np.int64).reshape(-1)
        if c.shape[0] != self.L:
            raise ValueError(f"ShardWriter.add_image: expected {self.L} codes, got {c.shape[0]}")
        if c.min() < 0 or c.max() >= self.K:
            raise ValueError(f"ShardWriter.add_image: codes must be in [0, {self.K})")
        if len(self._codes) == self.per_shard:
            self._flush()
        self._codes.append(c)
        return self._first + len(self._codes) - 1

    def _span(self, ids, what) -> List[int]:
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.T:
                raise ValueError(f"ShardWriter.{what}: text ids must be in [0, {self.T}), found {i}")
        start = len(self._text)
        self._text += ids
        return [start, len(ids)]

    def _local(self, image: int, what: str) -> int:
        j = image - self._first
        if not 0 <= j < len(self._codes):
            raise ValueError(
                f"ShardWriter.{what}: image {image} is not in the open shard (add records right after their image)"
            )
        return j

    def add_caption(self, image: int, text_ids: Sequence[int]) -> None:
        self._records.append([0, self._local(image, "add_caption")] + self._span(text_ids, "add_caption") + [0, 0])

    def add_vqa(self, image: int, question_ids: Sequence[int], answer_ids: Sequence[int]) -> None:
        if len(answer_ids) == 0:
            raise ValueError("ShardWriter.add_vqa: argument 'answer_ids' is empty")
        j = self._local(image, "add_vqa")
        self._records.append([1, j] + self._span(question_ids, "add_vqa") + self._span(answer_ids, "add_vqa"))

    def _flush(self):
        if not self._codes:
            return
        name = f"shard-{len(self.shards):05d}"
        dt = np.uint16 if self.K <= 65536 else np.int32
        np.save(os.path.join(self.path, name + ".codes.npy"), np.stack(self._codes).astype(dt))
        np.save(
            os.path.join(self.path, name + ".records.npy"), np.asarray(self._records, dtype=np.int64).reshape(-1, 6)
        )
        np.save(os.path.join(self.path, name + ".text.npy"), np.asarray(self._text, dtype=np.int32))
        self.shards.append(
            {"name": name, "images": len(self._codes), "records": len(self._records), "text_tokens": len(self._text)}
        )
        self._first += len(self._codes)
        self._reset()

    def close(self) -> str:
        self._flush()
        index = {
            "format": FORMAT,
            "version": VERSION,
            "image_tokens": self.L,
            "codebook_size": self.K,
            "text_vocab_size": self.T,
            "num_records": sum(s["records"] for s in self.shards),
            "shards": self.shards,
            "meta": self.meta,
        }
        tmp = os.path.join(self.path, "index.json.tmp")
        with open(tmp, "w") as f:
            json.dump(index, f, indent=1)
        os.replace(tmp, os.path.join(self.path, "index.json"))
        self.closed = True
        return self.path


class TokenDataset:
    """Memory-mapped reader of a dataset directory; ``ds[i]`` -> :class:`unif2ace.model.Sample`.

    Opening checks everything a wrong dataset could silently train on: every index.json field
    (types and ranges), every shard file (readable ``.npy``, integer dtype, the shape index.json
    states) and every record field (kind 0 or 1; image inside its shard; text and answer spans
    inside the shard's text; answer_len 0 for captions, >= 1 for VQA pairs), and the value ranges of
    the image codes and text ids (one pass over the memory-mapped arrays). The first violation
    raises a :class:`DataFormatError` naming the file, the record and the field."""

    def __init__(self, path: str):
        idx_path = os.path.join(path, "index.json")
        if not os.path.isfile(idx_path):
            raise DataFormatError(f"TokenDataset: {path!r} has no index.json (not a {FORMAT} directory)")
        try:
            with open(idx_path) as f:
                index = json.load(f)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"TokenDataset: {idx_path} is not valid JSON: {e}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise DataFormatError(f"TokenDataset: cannot read {idx_path}: {e}") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise DataFormatError(
                f"TokenDataset: {idx_path}: field 'format' must be {FORMAT!r}, got "
                f"{index.get('format') if isinstance(index, dict) else index!r}"
            )
        if index.get("version") != VERSION:
            raise DataFormatError(
                f"TokenDataset: {idx_path}: unsupported version {index.get('version')!r} "
                f"(this reader reads version {VERSION})"
            )
        for k in ("image_tokens", "codebook_size", "text_vocab_size", "shards"):
            if k not in index:
                raise DataFormatError(f"TokenDataset: {idx_path}: missing field {k!r}")
        self.path, self.index = path, index
        self.image_tokens = _count(index, "image_tokens", 1, idx_path)
        self.codebook_size = _count(index, "codebook_size", 1, idx_path)
        self.text_vocab_size = _count(index, "text_vocab_size", 1, idx_path)
        meta = index.get("meta", {})
        if not isinstance(meta, dict):
            raise DataFormatError(f"TokenDataset: {idx_path}: field 'meta' must be an object, got {meta!r}")
        self.meta = meta
        shards = index["shards"]
        if not isinstance(shards, list) or not shards:
            raise DataFormatError(
                f"TokenDataset: {idx_path}: field 'shards' must be a non-empty list of shard objects, got {shards!r}"
            )
        self.codes, self.records, self.text = [], [], []
        for i, s in enumerate(shards):
            where = f"{idx_path}: shards[{i}]"
            if not isinstance(s, dict):
                raise DataFormatError(f"TokenDataset: {where} must be an object, got {s!r}")
            name = s.get("name")
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise DataFormatError(
                    f"TokenDataset: {where}: field 'name' must be a file name stem (letters, digits, '._-'), "
                    f"got {name!r}"
                )
            n_img, n_rec, n_txt = (_count(s, k, 0, where) for k in ("images", "records", "text_tokens"))
            arrs = []
            for part, shape in (
                ("codes", (n_img, self.image_tokens)),
                ("records", (n_rec, 6)),
                ("text", (n_txt,)),
            ):
                fp = os.path.join(path, f"{name}.{part}.npy")
                try:
                    a = np.load(fp, mmap_mode="r")
                except (OSError, ValueError, EOFError) as e:  # EOFError: a zero-byte file
                    raise DataFormatError(f"TokenDataset: cannot read {fp}: {type(e).__name__}: {e}") from None
                if not isinstance(a, np.ndarray) or not np.issubdtype(a.dtype, np.integer):
                    raise DataFormatError(
                        f"TokenDataset: {fp} must hold an integer array, got {getattr(a, 'dtype', type(a).__name__)}"
                    )
                if tuple(a.shape) != tuple(shape):
                    raise DataFormatError(
                        f"TokenDataset: {fp} has shape {list(a.shape)}, index.json says {list(shape)}"
                    )
                arrs.append(a)
            codes, records, text = arrs
            _check_values(codes, 0, self.codebook_size, os.path.join(path, f"{name}.codes.npy"), "image code")
            _check_values(text, 0, self.text_vocab_size, os.path.join(path, f"{name}.text.npy"), "text id")
            _check_records(np.asarray(records), n_img, n_txt, os.path.join(path, f"{name}.records.npy"))
            self.codes.append(codes), self.records.append(records), self.text.append(text)
        counts = np.array([len(r) for r in self.records], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        if "num_records" in index and index["num_records"] != len(self):
            raise DataFormatError(
                f"TokenDataset: {idx_path}: field 'num_records' is {index['num_records']!r} but the shards hold "
                f"{len(self)} records"
            )
        if len(self) == 0:
            raise DataFormatError(f"TokenDataset: {path!r} has no records")

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(f"TokenDataset: record {i} out of range [0, {len(self)})")
        s = int(np.searchsorted(self._starts, i, side="right") - 1)
        return s, int(i - self._starts[s])

    def __getitem__(self, i: int):
        from unif2ace.model import Sample

        s, j = self.locate(int(i))
        kind, img, t0, tn, a0, an = (int(v) for v in self.records[s][j])
        codes = torch.from_numpy(np.asarray(self.codes[s][img], dtype=np.int64))
        text = self.text[s][t0 : t0 + tn].tolist()
        if kind == 0:
            return Sample("t2i", codes, text=text)
        return Sample("mmu", codes, text=text, answer=self.text[s][a0 : a0 + an].tolist())

    def check_config(self, cfg) -> None:
        """Raise a :class:`DataFormatError` naming the field when the model config cannot read this data."""
        if cfg.image_tokens != self.image_tokens:
            raise DataFormatError(
                f"data {self.path!r} has {self.image_tokens} image tokens per image but the model's "
                f"image_grid={cfg.image_grid} gives {cfg.image_tokens}"
            )
        if cfg.codebook_size < self.codebook_size:
            raise DataFormatError(
                f"data {self.path!r} has codebook_size={self.codebook_size}, larger than the model's "
                f"codebook_size={cfg.codebook_size}"
            )
        if cfg.text_vocab_size < self.text_vocab_size:
            raise DataFormatError(
                f"data {self.path!r} has text_vocab_size={self.text_vocab_size}, larger than the "
                f"model's text_vocab_size={cfg.text_vocab_size}"
            )


class EpochSampler:
    """Indices of the global batch of every optimizer step (see the module docstring)."""

    def __init__(self, num_records: int, global_batch: int, seed: int = 0, shuffle: bool = True):
        if global_batch < 1 or num_records < global_batch:
            raise ValueError(
                f"EpochSampler: the dataset has {num_records} records, fewer than one global batch of {global_batch}"
            )
        self.n, self.gb, self.seed, self.shuffle = num_records, global_batch, seed, shuffle
        self.steps_per_epoch = num_records // global_batch
        self._perm_epoch, self._perm = None, None

    def position(self, step: int) -> Dict[str, int]:
        return {
            "epoch": step // self.steps_per_epoch,
            "batch_in_epoch": step % self.steps_per_epoch,
            "samples_seen": step * self.gb,
        }

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perm = torch.randperm(self.n, generator=g).numpy()
            else:
                self._perm = np.arange(self.n)
            self._perm_epoch = epoch
        return self._perm

    def global_batch(self, step: int) -> np.ndarray:
        pos = self.position(step)
        b = pos["batch_in_epoch"]
        return self._permutation(pos["epoch"])[b * self.gb : (b + 1) * self.gb]

    def rank_slice(self, step: int, rank: int = 0, world_size: int = 1):
        """``(k0, indices)``: rank ``rank``'s contiguous share of step ``step``'s global batch; ``k0`` is
        the position of its first index in the global batch (it keys per-sample randomness, so any
        split of a global batch over ranks and accumulation steps sees the same samples)."""
        if self.gb % world_size:
            raise ValueError(f"EpochSampler: global batch {self.gb} is not divisible by world size {world_size}")
        per = self.gb // world_size
        return rank * per, self.global_batch(step)[rank * per : (rank + 1) * per]
