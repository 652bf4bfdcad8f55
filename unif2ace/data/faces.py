"""The built-in synthetic face set: procedurally drawn faces with 12 discrete attributes.

Everything is a pure function of a seed: :func:`sample_attributes` draws attribute dicts from a
``numpy.random.Generator``, :func:`render` draws one ``[H, W, 3]`` uint8 image (default 32 x 32)
from an attribute dict (no randomness: the image is fixed by its attributes), :func:`caption`
and :func:`vqa_pairs` build varied text from the attributes with the given generator.

Held-out split: an attribute *combination* is held out when a hash of it falls in the held-out
fraction (:func:`is_held_out`), so held-out captions describe faces never seen in training.

:class:`AttributeDecoder` reads attributes back from (generated) images: for every attribute and
value, a prototype is the mean image of renders that have that value (other attributes random),
optionally passed through an image tokenizer's encode/decode round trip; an image is assigned the
value whose prototype is nearest in a per-attribute pixel weighting (between-value over
within-value variance, so only the pixels the attribute changes count).
"""

from __future__ import annotations

import hashlib
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "ATTRIBUTES",
    "QUESTIONS",
    "IMAGE_SIZE",
    "sample_attributes",
    "render",
    "caption",
    "vqa_pairs",
    "is_held_out",
    "attribute_key",
    "vocabulary",
    "AttributeDecoder",
    "chance_accuracy",
]

IMAGE_SIZE = 32

# attribute -> (value -> RGB or None); the value names are single caption/answer words
ATTRIBUTES: Dict[str, Tuple[str, ...]] = {
    "face_shape": ("round", "oval", "square"),
    "skin": ("pale", "tan", "brown", "dark"),
    "hair_color": ("black", "blonde", "red", "gray"),
    "hair_style": ("short", "long"),
    "eye_color": ("blue", "green", "brown"),
    "brows": ("thin", "thick"),
    "glasses": ("no", "yes"),
    "beard": ("no", "yes"),
    "expression": ("smiling", "neutral", "surprised"),
    "earrings": ("no", "yes"),
    "hat": ("none", "red", "blue", "yellow"),
    "background": ("white", "green", "blue", "pink"),
}

_SKIN = {"pale": (250, 222, 200), "tan": (222, 172, 120), "brown": (160, 108, 68), "dark": (96, 62, 40)}
_HAIR = {"black": (28, 28, 30), "blonde": (240, 212, 96), "red": (196, 70, 28), "gray": (150, 150, 155)}
_EYE = {"blue": (40, 96, 230), "green": (30, 170, 60), "brown": (100, 52, 16)}
_HAT = {"red": (220, 28, 40), "blue": (28, 56, 200), "yellow": (236, 220, 24)}
_BG = {"white": (246, 246, 246), "green": (150, 214, 150), "blue": (150, 178, 236), "pink": (240, 176, 206)}
_BROW = (48, 32, 24)
_MOUTH = (150, 20, 40)
_FRAME = (20, 20, 20)
_GOLD = (255, 190, 0)

# question templates per attribute (the answer is the value word)
QUESTIONS: Dict[str, Tuple[str, ...]] = {
    "face_shape": ("what shape is the face ?", "is the face round oval or square ?"),
    "skin": ("what color is the skin ?", "what is the skin tone ?"),
    "hair_color": ("what color is the hair ?", "what is the hair color ?"),
    "hair_style": ("is the hair short or long ?", "how long is the hair ?"),
    "eye_color": ("what color are the eyes ?", "what is the eye color ?"),
    "brows": ("are the brows thin or thick ?", "how thick are the brows ?"),
    "glasses": ("does the person wear glasses ?", "are there glasses ?"),
    "beard": ("does the person have a beard ?", "is there a beard ?"),
    "expression": ("what is the expression ?", "how does the person look ?"),
    "earrings": ("does the person wear earrings ?", "are there earrings ?"),
    "hat": ("what color is the hat ?", "what hat does the person wear ?"),
    "background": ("what color is the background ?", "what is the background color ?"),
}


def sample_attributes(rng: np.random.Generator) -> Dict[str, str]:
    """One attribute dict, every attribute uniform over its values."""
    return {a: vals[int(rng.integers(len(vals)))] for a, vals in ATTRIBUTES.items()}


def attribute_key(attrs: Dict[str, str]) -> Tuple[int, ...]:
    """The attribute combination as value indices (in ``ATTRIBUTES`` order)."""
    try:
        return tuple(ATTRIBUTES[a].index(attrs[a]) for a in ATTRIBUTES)
    except (KeyError, ValueError) as e:
        raise ValueError(f"faces: bad attribute dict {attrs!r}: {e}") from None


def is_held_out(attrs: Dict[str, str], fraction: float = 0.1) -> bool:
    """True for the held-out combinations (a fixed hash of the combination, independent of seeds)."""
    h = hashlib.sha256(bytes(attribute_key(attrs))).digest()
    return int.from_bytes(h[:8], "little") / 2**64 < fraction


def _grid(n: int):
    y, x = np.mgrid[0:n, 0:n].astype(np.float64)
    return y + 0.5, x + 0.5


def render(attrs: Dict[str, str], size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw one face: ``[size, size, 3]`` uint8. Geometry is laid out on a 32-unit canvas and scaled."""
    attribute_key(attrs)  # validates
    s = size / 32.0
    y, x = _grid(size)
    y, x = y / s, x / s  # canvas units
    img = np.empty((size, size, 3), dtype=np.float64)
    img[:] = _BG[attrs["background"]]

    def paint(mask, rgb):
        img[mask] = rgb

    cy, cx = 17.0, 16.0
    hair = _HAIR[attrs["hair_color"]]
    # long hair falls behind the face to the shoulders
    if attrs["hair_style"] == "long":
        paint((np.abs(x - cx) < 11.5) & (y > 7) & (y < 30), hair)
    # the face
    shape = attrs["face_shape"]
    if shape == "round":
        face = ((x - cx) / 9.0) ** 2 + ((y - cy) / 9.0) ** 2 < 1
        half_w = 9.0
    elif shape == "oval":
        face = ((x - cx) / 7.0) ** 2 + ((y - cy) / 10.5) ** 2 < 1
        half_w = 7.0
    else:
        face = (np.abs(x - cx) < 8.5) & (np.abs(y - cy) < 9.0)
        half_w = 8.5
    paint(face, _SKIN[attrs["skin"]])
    # hair cap on top of the head
    cap = (((x - cx) / 10.0) ** 2 + ((y - 11.0) / 6.0) ** 2 < 1) & (y < 11.0)
    paint(cap, hair)
    # beard: lower part of the face
    if attrs["beard"] == "yes":
        paint(face & (y > 20.0), hair)
    # brows
    th = 1.0 if attrs["brows"] == "thin" else 2.2
    brow = (np.abs(np.abs(x - cx) - 4.0) < 2.5) & (y > 12.0 - th) & (y < 12.0)
    paint(brow, _BROW)
    # eyes
    eyes = (np.abs(np.abs(x - cx) - 4.0) < 1.5) & (np.abs(y - 14.5) < 1.5)
    paint(eyes, _EYE[attrs["eye_color"]])
    if attrs["glasses"] == "yes":
        ring = (np.abs(np.abs(x - cx) - 4.0) < 3.0) & (np.abs(y - 14.5) < 2.6)
        inner = (np.abs(np.abs(x - cx) - 4.0) < 2.0) & (np.abs(y - 14.5) < 1.6)
        bridge = (np.abs(x - cx) < 1.2) & (np.abs(y - 14.0) < 0.6)
        paint((ring & ~inner) | bridge, _FRAME)
    # mouth
    e = attrs["expression"]
    if e == "smiling":
        mouth = ((np.abs(x - cx) < 3.5) & (np.abs(y - 22.5) < 0.6)) | (
            (np.abs(np.abs(x - cx) - 3.5) < 1.0) & (np.abs(y - 21.5) < 0.6)
        )
    elif e == "neutral":
        mouth = (np.abs(x - cx) < 3.5) & (np.abs(y - 22.0) < 0.6)
    else:
        mouth = (np.abs(x - cx) < 1.6) & (np.abs(y - 22.0) < 1.6)
    paint(mouth, _MOUTH)
    if attrs["earrings"] == "yes":
        ear = (np.abs(np.abs(x - cx) - (half_w + 0.5)) < 1.3) & (np.abs(y - 20.0) < 1.3)
        paint(ear, _GOLD)
    if attrs["hat"] != "none":
        hat = ((np.abs(x - cx) < 8.0) & (y > 1.0) & (y < 7.0)) | ((np.abs(x - cx) < 12.0) & (y >= 6.0) & (y < 8.0))
        paint(hat, _HAT[attrs["hat"]])
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _phrases(attrs: Dict[str, str]) -> Dict[str, List[str]]:
    a = attrs
    return {
        "face_shape": [a["face_shape"], "face"],
        "skin": [a["skin"], "skin"],
        "hair_color": [a["hair_color"], "hair"],
        "hair_style": [a["hair_style"], "hair"],
        "eye_color": [a["eye_color"], "eyes"],
        "brows": [a["brows"], "brows"],
        "glasses": ["glasses"] if a["glasses"] == "yes" else ["no", "glasses"],
        "beard": ["beard"] if a["beard"] == "yes" else ["no", "beard"],
        "expression": [a["expression"]],
        "earrings": ["earrings"] if a["earrings"] == "yes" else ["no", "earrings"],
        "hat": ["no", "hat"] if a["hat"] == "none" else [a["hat"], "hat"],
        "background": [a["background"], "background"],
    }


def caption(
    attrs: Dict[str, str], rng: Optional[np.random.Generator] = None, *, full: bool = False
) -> Tuple[List[str], List[str]]:
    """A caption as words and the attributes it mentions.

    ``full=True``: every attribute, in the canonical order (hair colour and style merged as
    ``"blonde long hair"``). Otherwise a random subset of at least 8 attributes in random order,
    starting with ``"a"`` or ``"a person with"``. Captions have at most 29 words.
    """
    ph = _phrases(attrs)
    names = list(ATTRIBUTES)
    if not full:
        if rng is None:
            raise ValueError("caption: argument 'rng' is required unless full=True")
        k = int(rng.integers(8, len(names) + 1))
        names = [names[i] for i in rng.permutation(len(names))[:k]]
    words: List[str] = [] if full or rng is None or rng.random() < 0.5 else ["a", "person", "with"]
    done = set()
    for n in names:
        if n in done:
            continue
        if n in ("hair_color", "hair_style") and {"hair_color", "hair_style"} <= set(names):
            words += [attrs["hair_color"], attrs["hair_style"], "hair"]
            done |= {"hair_color", "hair_style"}
        else:
            words += ph[n]
            done.add(n)
    return words, sorted(done, key=names.index)


def vqa_pairs(attrs: Dict[str, str], rng: np.random.Generator, n: int) -> List[Tuple[str, List[str], str]]:
    """``n`` (attribute, question words, answer word) triples about distinct random attributes."""
    names = list(ATTRIBUTES)
    out = []
    for i in rng.permutation(len(names))[:n]:
        a = names[int(i)]
        q = QUESTIONS[a][int(rng.integers(len(QUESTIONS[a])))]
        out.append((a, q.split(), attrs[a]))
    return out


def vocabulary() -> List[str]:
    """Every word captions, questions and answers use, sorted (deterministic)."""
    words = {
        "a",
        "person",
        "with",
        "no",
        "face",
        "skin",
        "hair",
        "eyes",
        "brows",
        "glasses",
        "beard",
        "earrings",
        "hat",
        "background",
    }
    for vals in ATTRIBUTES.values():
        words.update(vals)
    for qs in QUESTIONS.values():
        for q in qs:
            words.update(q.split())
    return sorted(words)


def chance_accuracy(attributes: Sequence[str]) -> float:
    """Expected accuracy of uniform guessing over the listed attributes' values."""
    if not attributes:
        return 0.0
    return float(np.mean([1.0 / len(ATTRIBUTES[a]) for a in attributes]))


class AttributeDecoder:
    """Nearest-prototype attribute reader built from the renderer (see the module docstring).

    ``roundtrip``: optional ``images [N, H, W, 3] uint8 -> images`` applied to the prototype renders
    (the image tokenizer's encode/decode), so prototypes look like decoded generations.
    """

    def __init__(
        self,
        seed: int = 1234,
        per_value: int = 48,
        size: int = IMAGE_SIZE,
        roundtrip: Optional[Callable[[np.ndarray], np.ndarray]] = None,
    ):
        rng = np.random.default_rng(seed)
        self.size = size
        self.roundtrip = roundtrip
        self.protos: Dict[str, np.ndarray] = {}
        self.weights: Dict[str, np.ndarray] = {}
        for a, vals in ATTRIBUTES.items():
            groups = []
            for v in vals:
                imgs = []
                for _ in range(per_value):
                    at = sample_attributes(rng)
                    at[a] = v
                    imgs.append(render(at, size))
                imgs = np.stack(imgs)
                if roundtrip is not None:
                    imgs = roundtrip(imgs)
                groups.append(imgs.astype(np.float64) / 255.0)
            means = np.stack([g.mean(0) for g in groups])  # [V, H, W, 3]
            within = np.mean([g.var(0) for g in groups], axis=0).sum(-1)  # [H, W]
            between = means.var(0).sum(-1)
            self.protos[a] = means
            self.weights[a] = between / (within + 1e-3)

    def _nearest_prototype(self, x: np.ndarray) -> List[Dict[str, str]]:
        out: List[Dict[str, str]] = [{} for _ in range(len(x))]
        for a, vals in ATTRIBUTES.items():
            d = ((x[:, None] - self.protos[a][None]) ** 2).sum(-1)  # [N, V, H, W]
            best = (d * self.weights[a]).sum((-1, -2)).argmin(1)
            for i, b in enumerate(best):
                out[i][a] = vals[int(b)]
        return out

    def _renders(self, attrs: List[Dict[str, str]]) -> np.ndarray:
        imgs = np.stack([render(a, self.size) for a in attrs])
        if self.roundtrip is not None:
            imgs = self.roundtrip(imgs)
        return imgs.astype(np.float64) / 255.0

    def predict(self, images: np.ndarray, sweeps: int = 2) -> List[Dict[str, str]]:
        """``images [N, H, W, 3] uint8`` -> one attribute dict per image.

        Starts from the nearest prototype per attribute, then refines by analysis-by-synthesis:
        ``sweeps`` rounds of coordinate descent, each trying every value of every attribute with
        the others held, keeping the one whose (round-tripped) render is nearest in pixels.
        """
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (self.size, self.size, 3):
            raise ValueError(
                f"AttributeDecoder.predict: argument 'images' must be [N, {self.size}, {self.size}, 3], "
                f"got {list(images.shape)}"
            )
        x = images.astype(np.float64) / 255.0
        cur = self._nearest_prototype(x)
        for _ in range(sweeps):
            for a, vals in ATTRIBUTES.items():
                cand = [dict(c, **{a: v}) for c in cur for v in vals]
                r = self._renders(cand).reshape(len(x), len(vals), *x.shape[1:])
                d = ((r - x[:, None]) ** 2).sum((2, 3, 4))
                for i, b in enumerate(d.argmin(1)):
                    cur[i] = dict(cur[i], **{a: vals[int(b)]})
        return cur
