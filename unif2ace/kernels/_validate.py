"""Input checks at the API boundary: clear errors naming the op, the argument, what was expected
and what was given -- never an index error from inside a kernel.

Shape, dtype and device checks are free (metadata only) and always run. Value checks (index
ranges such as ``0 <= target < V``) need to read the tensor, which is a host sync on a GPU; they run
by default, are skipped while ``torch.compile`` traces, and can be switched off for sync-free
production use (CUDA graphs) with ``UNIF2ACE_CHECK_VALUES=0`` or :func:`set_value_checks`.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
from typing import Iterable, List, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT_DTYPES = (torch.int32, torch.int64)

_value_checks: Optional[bool] = None


def set_value_checks(enabled: Optional[bool]) -> None:
    """Enable/disable value checks globally (None: follow ``UNIF2ACE_CHECK_VALUES``, default on)."""
    global _value_checks
    _value_checks = enabled


def value_checks_enabled() -> bool:
    if torch.compiler.is_compiling():
        return False
    if _value_checks is not None:
        return _value_checks
    return os.environ.get("UNIF2ACE_CHECK_VALUES", "1") != "0"


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    op: str,
    name: str,
    t,
    *,
    ndim: Optional[int | Sequence[int]] = None,
    dtypes: Optional[Sequence[torch.dtype]] = None,
    shape: Optional[Sequence[Optional[int]]] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Check one tensor argument. ``shape`` entries that are None match any size."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{op}: argument '{name}' must be {want}, got shape {tuple(t.shape)}")
    if shape is not None:
        ok = t.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, t.shape))
        if not ok:
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{op}: argument '{name}' must have shape {want}, got {list(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{op}: argument '{name}' must have dtype in ({_dtype_names(dtypes)}), got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: argument '{name}' must be on {device}, got {t.device}")
    return t


def check_same_device(op: str, **tensors) -> torch.device:
    """All given (non-None) tensors on one device; returns it."""
    dev = None
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if dev is None:
            dev, first = t.device, name
        elif t.device != dev:
            raise ValueError(
                f"{op}: all tensors must be on one device; '{first}' is on {dev} but '{name}' is on {t.device}"
            )
    return dev if dev is not None else torch.device("cpu")


def check_range(op: str, name: str, t: torch.Tensor, low: int, high: int, *, allow: Optional[int] = None) -> None:
    """Value check: every element in [low, high) (elements equal to ``allow`` are exempt)."""
    if not value_checks_enabled() or t.numel() == 0:
        return
    vals = t if allow is None else t[t != allow]
    if vals.numel() == 0:
        return
    lo, hi = int(vals.min()), int(vals.max())
    if lo < low or hi >= high:
        extra = f" (or {allow})" if allow is not None else ""
        raise ValueError(
            f"{op}: argument '{name}' must hold values in [{low}, {high}){extra}, got values in [{lo}, {hi}]"
        )


def check_float_range(op: str, name: str, t: torch.Tensor, low: float, high: float, *, low_open: bool = False) -> None:
    """Value check for float tensors: low <= t <= high (low < t when ``low_open``); no NaN."""
    if not value_checks_enabled() or t.numel() == 0:
        return
    tf = t.float()
    bad = torch.isnan(tf) | (tf > high) | ((tf <= low) if low_open else (tf < low))
    if bool(bad.any()):
        lb = "(" if low_open else "["
        raise ValueError(
            f"{op}: argument '{name}' must hold values in {lb}{low}, {high}], got values in "
            f"[{float(tf.min())}, {float(tf.max())}]" + (" with NaN" if bool(torch.isnan(tf).any()) else "")
        )


def check_choice(op: str, name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{op}: argument '{name}' must be one of {list(choices)}, got {value!r}")


# ------------------------------------------------------------------------------------------------
# scalar arguments. One rule for every op: an integer argument is anything ``operator.index``
# accepts (Python ints, numpy integer scalars) except bool; a real argument is a
# ``numbers.Real`` (Python / numpy floats and ints) except bool and tensors.


def check_int(op: str, name: str, v, *, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """An integer argument in ``[low, high)``; returns it as a Python int."""
    if isinstance(v, bool):
        raise TypeError(f"{op}: argument '{name}' must be an int, got bool")
    try:
        iv = operator.index(v)
    except TypeError:
        raise TypeError(f"{op}: argument '{name}' must be an int, got {type(v).__name__}") from None
    if (low is not None and iv < low) or (high is not None and iv >= high):
        lo = "-inf" if low is None else str(low)
        hi = "inf" if high is None else str(high)
        raise ValueError(f"{op}: argument '{name}' must be in [{lo}, {hi}), got {iv}")
    return iv


def check_real(
    op: str,
    name: str,
    v,
    *,
    low: Optional[float] = None,
    low_open: bool = False,
    high: Optional[float] = None,
) -> float:
    """A finite real argument with optional bounds (``low < v`` when ``low_open``, ``v <= high``)."""
    if isinstance(v, (bool, torch.Tensor)) or not isinstance(v, numbers.Real):
        raise TypeError(f"{op}: argument '{name}' must be a real number, got {type(v).__name__}")
    fv = float(v)
    bad = not math.isfinite(fv)
    if low is not None:
        bad = bad or (fv <= low if low_open else fv < low)
    if high is not None:
        bad = bad or fv > high
    if bad:
        lb = "(" if low_open else "["
        rng = f"{lb}{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ValueError(f"{op}: argument '{name}' must be a finite number in {rng}, got {v!r}")
    return fv


def check_bool(op: str, name: str, v) -> bool:
    """A bool argument (Python or numpy bool); strings such as ``"no"`` are rejected."""
    if isinstance(v, bool) or (type(v).__module__ == "numpy" and type(v).__name__ in ("bool_", "bool")):
        return bool(v)
    raise TypeError(f"{op}: argument '{name}' must be a bool, got {type(v).__name__} {v!r}")


def check_int_list(op: str, name: str, v, *, low: Optional[int] = None) -> List[int]:
    """A non-empty list/tuple of integer arguments, each ``>= low``."""
    if isinstance(v, torch.Tensor) or not isinstance(v, (list, tuple)) or not v:
        raise TypeError(f"{op}: argument '{name}' must be a non-empty list of ints, got {v!r}")
    out = []
    for i, x in enumerate(v):
        try:
            out.append(check_int(op, f"{name}[{i}]", x, low=low))
        except (TypeError, ValueError) as e:
            raise type(e)(f"{e} (in {name}={list(v)!r})") from None
    return out


def check_int_at_least(op: str, name: str, v, low: int) -> int:
    """An integer argument ``>= low`` (a count or a size; the error says "must be >= low")."""
    iv = check_int(op, name, v)
    if iv < low:
        raise ValueError(f"{op}: argument '{name}' must be >= {low}, got {iv}")
    return iv
