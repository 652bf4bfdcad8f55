"""The built-in synthetic face set: procedurally drawn faces with 12 discrete attributes.

Everything is a pure function of a seed: :func:`sample_attributes` draws attribute dicts from a
``numpy.random.Generator``, :func:`render` draws one ``[H, W, 3]`` uint8 image (default 32 x 32)
from an attribute dict (no randomness: the image is fixed by its attributes; :func:`render_batch`
draws many at once), :func:`caption` and :func:`vqa_pairs` build varied text from the attributes
with the given generator. The face is laid out on the 8 x 8 grid of the image tokenizer's 4-pixel
patches, so that every attribute is drawn at a size a patch carries and each patch depends on few
attributes (the layout: :func:`render_batch`): all faces together have fewer than 300 distinct
patches, which a 512-code patch VQ keeps exactly.

Held-out split: an attribute *combination* is held out when a hash of it falls in the held-out
fraction (:func:`is_held_out`), so held-out captions describe faces never seen in training.

:class:`AttributeDecoder` reads attributes back from (generated) images: for every attribute and
value, a prototype is the mean image of renders that have that value (other attributes random),
optionally passed through an image tokenizer's encode/decode round trip; an image is assigned the
value whose prototype is nearest in a per-attribute pixel weighting (between-value over
within-value variance, so only the pixels the attribute changes count).
"""

from __future__ import annotations

import functools
import hashlib
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "ATTRIBUTES",
    "QUESTIONS",
    "IMAGE_SIZE",
    "sample_attributes",
    "render",
    "render_batch",
    "caption",
    "caption_chunks",
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


_SHIRT = (58, 66, 92)
_NOSE_SHADE = 0.82  # the nose is the skin colour darkened by this factor


def _face_half_width(shape: str, y: np.ndarray) -> np.ndarray:
    """Half width of the face at canvas row ``y`` (the face spans rows 8..28, x = 16 +- half width).

    Rows 12..24 are 12 wide for every shape; the shapes differ only at the temples (patch row 2)
    and the jaw (patch row 6): square keeps its corners, round rounds them (radius 5), oval tapers
    the temples and ends in a pointed chin."""
    hw = np.full_like(y, 12.0)
    if shape == "round":
        hw = np.where(y < 13, 7 + np.sqrt(np.clip(25 - (13 - y) ** 2, 0, None)), hw)
        hw = np.where(y > 23, 7 + np.sqrt(np.clip(25 - (y - 23) ** 2, 0, None)), hw)
    elif shape == "oval":
        hw = np.where(y < 12, np.maximum(8.0, 12 - 1.4 * (12 - y)), hw)
        hw = np.where(y > 24, 12 - 2.6 * (y - 24), hw)
    return hw


@functools.lru_cache(maxsize=8)
def _masks(size: int) -> Dict[str, np.ndarray]:
    """The renderer's geometry at ``size`` px: boolean masks ``[H, W]`` (or ``[V, H, W]`` per value)."""
    s = size / 32.0
    y, x = _grid(size)
    y, x = y / s, x / s  # canvas units
    dx = np.abs(x - 16.0)
    inner = dx < 12  # columns 1-6
    eye_cols = np.abs(dx - 6) < 2  # the eye/brow patches: columns 2 and 5
    face = np.stack([(y >= 8) & (y < 28) & (dx < _face_half_width(v, y)) for v in ATTRIBUTES["face_shape"]])
    mouths = {
        "smiling": ((dx < 2) & (y >= 22) & (y < 23)) | ((np.abs(dx - 2.5) < 0.5) & (y >= 21) & (y < 22)),
        "neutral": (dx < 3) & (y >= 22) & (y < 23),
        "surprised": (dx < 1) & (y >= 21) & (y < 24),
    }
    brows = {"thin": 1.0, "thick": 2.0}  # thickness, ending a unit above the eyes
    m = {
        "long_hair": ~inner & (y >= 8),  # the edge columns, from the forehead down
        "hat": (y < 4) & (dx < 8 + np.sqrt(np.clip(16 - (4 - y) ** 2, 0, None))),
        "hair_cap": (y >= 4) & (y < 8) & (dx < 8 + np.sqrt(np.clip(16 - (8 - y) ** 2, 0, None))),
        "temples": inner & (y >= 8) & (y < 12),  # hair beside the forehead
        "shirt": inner & (y >= 24),  # around the jaw and below
        "face": face,
        "jaw": y >= 24,  # the face below this grows a beard
        "brows": np.stack([eye_cols & (y >= 11 - brows[v]) & (y < 11) for v in ATTRIBUTES["brows"]]),
        "eye_patch": eye_cols & (y >= 12) & (y < 16),  # filled by the glasses' frame
        "glasses_bar": inner & (y >= 13) & (y < 14),  # bridge and arms
        "iris": (np.abs(dx - 6) < 1) & (y >= 13) & (y < 15),
        "nose": (dx < 1) & (y >= 17) & (y < 20),
        "mouth": np.stack([mouths[v] for v in ATTRIBUTES["expression"]]),
        "earrings": (np.abs(dx - 13) < 1) & (y >= 17) & (y < 20),
    }
    for v in m.values():
        v.setflags(write=False)
    return m


_LAYERS = ("background", "hair", "hat", "shirt", "skin", "brow", "frame", "iris", "nose", "mouth", "gold")


def _palette(table: Dict[str, Tuple[int, int, int]], values: Sequence[str]) -> np.ndarray:
    return np.array([table.get(v, (0, 0, 0)) for v in values], dtype=np.float64).reshape(len(values), 3)


def render_batch(attrs: Sequence[Dict[str, str]], size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw faces: ``[N, size, size, 3]`` uint8, ``render_batch(attrs)[i] == render(attrs[i])``.

    The layout follows the 8 x 8 grid of 4-unit patches of the image tokenizer (a 32-unit canvas,
    scaled to ``size``), so every attribute is drawn at a size one patch carries and each patch
    depends on few attributes (rows/cols are patch indices)::

        row 0     hat (cols 1-6; background without a hat)
        row 1     hair cap (cols 1-6, rounded outer corners)
        row 2     forehead: temples (cols 1, 6: face shape vs hair), brows (cols 2, 5: 1 or 2 units)
        row 3     eyes (cols 2, 5: a 2 x 2 iris; glasses = the patch's frame + bridge + arms)
        row 4     nose (cols 3-4), earrings (cols 0, 7: a gold stud beside the face)
        row 5     mouth (cols 3-4: smiling / neutral / surprised)
        row 6     jaw (cols 1-6: face shape; a beard in the hair colour), shirt around it
        row 7     shirt (cols 1-6)
        cols 0, 7 background, or the hair colour below row 1 for long hair

    Each pixel gets a layer (background, hair, skin, ...) painted in order, then the layer's colour
    for that face.
    """
    keys = np.array([attribute_key(a) for a in attrs], dtype=np.int64).reshape(len(attrs), len(ATTRIBUTES))
    col = {a: keys[:, i] for i, a in enumerate(ATTRIBUTES)}
    val = {a: [ATTRIBUTES[a][j] for j in col[a]] for a in ATTRIBUTES}
    m = _masks(size)
    n = len(attrs)
    lab = np.zeros((n, size, size), dtype=np.int8)

    def paint(mask, layer):
        np.copyto(lab, np.int8(_LAYERS.index(layer)), where=mask)

    def has(a, v):
        return (col[a] == ATTRIBUTES[a].index(v))[:, None, None]

    paint(m["long_hair"] & has("hair_style", "long"), "hair")
    paint(m["hat"] & ~has("hat", "none"), "hat")
    paint(m["hair_cap"] | m["temples"], "hair")
    paint(m["shirt"], "shirt")
    face = m["face"][col["face_shape"]]
    paint(face, "skin")
    paint(face & m["jaw"] & has("beard", "yes"), "hair")
    paint(m["brows"][col["brows"]], "brow")
    paint((m["eye_patch"] | m["glasses_bar"]) & has("glasses", "yes"), "frame")
    paint(m["iris"], "iris")
    paint(m["nose"], "nose")
    paint(m["mouth"][col["expression"]], "mouth")
    paint(m["earrings"] & has("earrings", "yes"), "gold")
    skin = _palette(_SKIN, val["skin"])
    pal = np.empty((n, len(_LAYERS), 3), dtype=np.float64)
    pal[:] = [(0, 0, 0), (0, 0, 0), (0, 0, 0), _SHIRT, (0, 0, 0), _BROW, _FRAME, (0, 0, 0), (0, 0, 0), _MOUTH, _GOLD]
    for layer, colours in (
        ("background", _palette(_BG, val["background"])),
        ("hair", _palette(_HAIR, val["hair_color"])),
        ("hat", _palette(_HAT, val["hat"])),
        ("skin", skin),
        ("iris", _palette(_EYE, val["eye_color"])),
        ("nose", _NOSE_SHADE * skin),
    ):
        pal[:, _LAYERS.index(layer)] = colours
    pal = np.clip(np.rint(pal), 0, 255).astype(np.uint8)
    return pal[np.arange(n)[:, None, None], lab]


def render(attrs: Dict[str, str], size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw one face: ``[size, size, 3]`` uint8 (the layout: :func:`render_batch`)."""
    return render_batch([attrs], size)[0]


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
    attrs: Dict[str, str], rng: Optional[np.random.Generator] = None, *, full: bool = False, shuffle: bool = False
) -> Tuple[List[str], List[str]]:
    """A caption as words and the attributes it mentions.

    ``full=True``: every attribute, in the canonical order (hair colour and style merged as
    ``"blonde long hair"``). Otherwise a random subset of at least 8 attributes, in the canonical
    order (``shuffle=True``: in random order), starting with ``"a"`` or ``"a person with"``.
    Captions have at most 29 words. The canonical order is the synthetic set's default: a small
    model then binds each value word to its attribute by place (``"no"`` before ``"beard"``,
    ``"blue"`` before ``"hat"``), and the full captions of the evaluation are in the order it
    trained on (README.md, Demo recipe).
    """
    ph = _phrases(attrs)
    names = list(ATTRIBUTES)
    if not full:
        if rng is None:
            raise ValueError("caption: argument 'rng' is required unless full=True")
        k = int(rng.integers(8, len(names) + 1))
        pick = rng.permutation(len(names))[:k]
        names = [names[i] for i in (pick if shuffle else np.sort(pick))]
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


def caption_chunks(attrs: Dict[str, str]) -> List[Tuple[List[str], str]]:
    """The full caption (``caption(attrs, full=True)``) as ``(words, attribute)`` chunks in order; the
    merged hair phrase ``"<colour> <style> hair"`` is the chunks ``[colour]`` (hair_color) and
    ``[style, "hair"]`` (hair_style)."""
    ph = _phrases(attrs)
    out = []
    for a in ATTRIBUTES:
        if a == "hair_color":
            out.append(([attrs[a]], a))
        elif a == "hair_style":
            out.append(([attrs[a], "hair"], a))
        else:
            out.append((ph[a], a))
    return out


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
                imgs = render_batch([dict(sample_attributes(rng), **{a: v}) for _ in range(per_value)], size)
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
        imgs = render_batch(attrs, self.size)
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
