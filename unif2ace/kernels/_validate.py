"""Input checks at the API boundary: clear errors naming the op, the argument, what was expected
and what was given -- never an index error from inside a kernel.

Shape, dtype and device checks are free (metadata only) and always run. Value checks (index
ranges such as ``0 <= target < V``) read the tensor. How, is the value-check mode
(:func:`set_value_checks`, or the environment variable ``UNIF2ACE_CHECK_VALUES``):

- ``"on"`` (default; ``1``): CPU tensors are checked on the host (a ``ValueError`` naming the
  argument and the values found). Tensors on a GPU are checked **on the device, without a host
  sync**: the condition is reduced there and handed to ``torch._assert_async``, so the ops stay
  free of host syncs and capturable in CUDA graphs. A failure is a device-side assert, reported
  at the next synchronisation, and it ends the process's CUDA context (like an out-of-range
  index in ``torch.gather``); rerun with ``"sync"`` to get the named error.
- ``"sync"``: host checks on every device -- the named ``ValueError``, at the cost of a host sync
  per check on a GPU (debugging).
- ``"off"`` (``0``): no value checks; out-of-range values then give what the kernels document
  (e.g. a NaN target logit), or undefined results.

Value checks are skipped while ``torch.compile`` traces.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
from typing import Iterable, List, Optional, Sequence, Union

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT_DTYPES = (torch.int32, torch.int64)

VALUE_CHECK_MODES = ("on", "sync", "off")
_value_checks: Optional[str] = None
_MODE_NAMES = {"1": "on", "on": "on", "true": "on", "sync": "sync", "0": "off", "off": "off", "false": "off"}


def _mode(v, what: str) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    m = _MODE_NAMES.get(str(v).strip().lower())
    if m is None:
        raise ValueError(f"{what} must be one of on/1, sync, off/0 (or a bool), got {v!r}")
    return m


def set_value_checks(enabled: Optional[Union[bool, str]]) -> None:
    """Set the value-check mode globally: ``True``/``"on"`` (default: host checks on CPU tensors,
    sync-free device checks on GPU tensors), ``"sync"`` (host checks everywhere, named errors),
    ``False``/``"off"``; ``None``: follow ``UNIF2ACE_CHECK_VALUES`` (``1``/``on``, ``sync``,
    ``0``/``off``; default on)."""
    global _value_checks
    _value_checks = None if enabled is None else _mode(enabled, "set_value_checks: the mode")


def value_check_mode() -> str:
    """The value-check mode in force: ``"on"``, ``"sync"`` or ``"off"`` (always off while
    ``torch.compile`` traces)."""
    if torch.compiler.is_compiling():
        return "off"
    if _value_checks is not None:
        return _value_checks
    return _mode(os.environ.get("UNIF2ACE_CHECK_VALUES", "1"), "UNIF2ACE_CHECK_VALUES")


def value_checks_enabled() -> bool:
    return value_check_mode() != "off"


def _checks_on_host(t: torch.Tensor) -> Optional[bool]:
    """None: no value check; True: read ``t`` on the host; False: check it on its device (no sync)."""
    mode = value_check_mode()
    if mode == "off" or t.numel() == 0:
        return None
    return t.device.type == "cpu" or mode == "sync"


def _assert_on_device(bad: Optional[torch.Tensor], message: str) -> None:
    """Device-side check (no host sync): fails asynchronously if any element of ``bad`` is set."""
    if bad is not None:
        torch._assert_async(torch.logical_not(bad.any()), message)


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
    on_host = _checks_on_host(t)
    if on_host is None:
        return
    extra = f" (or {allow})" if allow is not None else ""
    if not on_host:
        bad = None
        info = torch.iinfo(t.dtype) if not (t.is_floating_point() or t.dtype == torch.bool) else None
        if info is None or low > info.min:  # a bound outside the dtype's range cannot be broken
            bad = t < low
        if info is None or high <= info.max:
            bad = (t >= high) if bad is None else bad | (t >= high)
        if bad is not None and allow is not None:
            bad = bad & (t != allow)
        _assert_on_device(bad, f"{op}: argument '{name}' must hold values in [{low}, {high}){extra}")
        return
    vals = t if allow is None else t[t != allow]
    if vals.numel() == 0:
        return
    lo, hi = int(vals.min()), int(vals.max())
    if lo < low or hi >= high:
        raise ValueError(
            f"{op}: argument '{name}' must hold values in [{low}, {high}){extra}, got values in [{lo}, {hi}]"
        )


def check_float_range(op: str, name: str, t: torch.Tensor, low: float, high: float, *, low_open: bool = False) -> None:
    """Value check for float tensors: low <= t <= high (low < t when ``low_open``); no NaN."""
    on_host = _checks_on_host(t)
    if on_host is None:
        return
    lb = "(" if low_open else "["
    if not on_host:
        bad = torch.isnan(t) | ((t <= low) if low_open else (t < low))
        if high != float("inf"):
            bad = bad | (t > high)
        _assert_on_device(bad, f"{op}: argument '{name}' must hold values in {lb}{low}, {high}]")
        return
    tf = t.float()
    bad = torch.isnan(tf) | (tf > high) | ((tf <= low) if low_open else (tf < low))
    if bool(bad.any()):
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
    if isinstance(v, bool) or type(v).__name__ == "bool_":
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
