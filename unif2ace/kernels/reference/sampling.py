"""Reference masked-token sampling (docs/model.md §4, one MaskGIT/Show-o step) and autoregressive
sampling (§5). Plain PyTorch, fp32 logits math, fp64 noise (see :mod:`.rng`). These functions are
the semantics every backend is tested against; they do not validate their arguments (the public
ops in ``unif2ace.kernels.sampling`` do).

Randomness comes only from the counter-based RNG of :mod:`.rng`, keyed by
``(seed, step, sample id, position, token)``: stream 0 is the draw of the code (one 64-bit number
per position, token 0), stream 1 the confidence noise (a Gumbel per position, token 0); every
MaskGIT step draws fresh numbers (``ar_sample`` uses step 0: its position is the decode step). Results therefore do
not depend on the batch composition or order, only on each row's sample id.

Log-probabilities (the confidence of the masked step, the logprobs of ``ar_sample``) are the
exactly defined fp32 log-softmax of :mod:`.rng` (:func:`log_prob`): the exponentials are summed in
fixed point, so a row and any permutation of it give the same value, bit for bit, on every
backend -- and exact ties in confidence are ranked by position everywhere.

Sanitising (both ops): the logits (the guidance-combined logits for the masked step) are taken to
fp32; NaN becomes -inf (the code can never be drawn) and +inf becomes FLT_MAX (finite, so
log-softmax stays defined). A row with no finite value left (all -inf or NaN) samples code 0 with
confidence / log-probability -inf.

Temperature: ``scaled = min(x / fp32(temperature), FLT_MAX)`` with IEEE fp32 division (a logit so
large that dividing by a small temperature overflows is clamped to FLT_MAX). A code is drawn from
``softmax(scaled)`` by :func:`draw_code`: the exact fixed-point probabilities of :mod:`.rng` and one
64-bit random draw per row, inverse transform in integers -- no per-code random number, and every
backend draws the same code. Every argmax in this module breaks ties towards the lowest index.

Top-k (k >= V: no filtering): keep v iff ``x_v >= `` the k-th largest value of the row (all ties
at the boundary are kept, so more than k codes can survive); the rest become -inf.

The work is done in chunks of rows so the temporaries (int64 random words, fp64 noise) stay
bounded for any B·L·V.

The pieces every backend's host code needs as well -- the guidance combine
(:func:`guided_logits`), the top-k threshold (:func:`top_k_threshold`), the filtered AR scores
(:func:`ar_scores`), a step's host scalars (:func:`step_scalars`), the sample-id / position
defaults (:func:`row_sample_ids`, :func:`row_positions`) and the re-mask ranking
(:func:`remask`) -- are defined here once; the fast backends call them instead of restating them.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from . import rng

__all__ = [
    "MaskedStepOutput",
    "ARSample",
    "SCHEDULES",
    "FLT_MAX",
    "mask_schedule",
    "num_to_keep_masked",
    "StepScalars",
    "StepParams",
    "step_scalars",
    "row_sample_ids",
    "row_positions",
    "sanitize_logits",
    "log_prob",
    "draw_code",
    "guidance_factors",
    "active_uncond",
    "guided_logits",
    "top_k_threshold",
    "top_k_filter",
    "top_p_filter",
    "ar_greedy",
    "ar_scores",
    "remask",
    "masked_sample_step_ref",
    "ar_sample_ref",
]

SCHEDULES = ("cosine", "linear", "pow", "sigmoid")
FLT_MAX = torch.finfo(torch.float32).max
SCHEDULE_CLIP_MIN = 1e-6

# elements (rows x V) per chunk: bounds the int64 / fp64 temporaries of the reference and keeps
# them cache-resident (2 MB each; 4-5x faster than whole-tensor passes on CPU)
CHUNK_ELEMS = 1 << 18
# on a GPU the per-chunk launch overhead dominates instead: 64M elements (512 MB per int64 temp)
CHUNK_ELEMS_CUDA = 1 << 26


class MaskedStepOutput(NamedTuple):
    """Result of one MaskGIT step (all ``[B, L]``)."""

    tokens: Tensor
    """int64: the sampled code at positions that stay decoded, ``mask_token_id`` at (re)masked
    positions, the input token elsewhere."""
    is_masked: Tensor
    """bool: positions still masked after this step."""
    sampled: Tensor
    """int64: the code drawn at every input-masked position (the input token elsewhere)."""
    confidence: Tensor
    """fp32: ``log p(sampled) + noise`` at input-masked positions, +inf elsewhere."""


class ARSample(NamedTuple):
    """Result of one autoregressive sampling step (all ``[B]``)."""

    tokens: Tensor
    """int64: the drawn token."""
    logprobs: Optional[Tensor]
    """fp32: ``log_softmax(logits)[token]`` (:func:`log_prob`) of the model's own distribution
    (temperature 1, no top-k/top-p filtering); -inf for a row with no finite logit. None when
    :func:`unif2ace.kernels.ar_sample` was called with ``return_logprobs=False``."""


# --------------------------------------------------------------------------------------------
# schedules


def mask_schedule(name: str, ratio: float, exponent: float = 2.0) -> float:
    """Mask ratio γ(r) of the MaskGIT schedules (as in Show-o ``models/sampling.py``), float64.

    ``r`` in [0, 1] is the fraction of steps done, ``(step + 1) / num_steps``.

    - ``cosine``:  cos(π r / 2)
    - ``linear``:  1 − r, clipped to [1e-6, 1]
    - ``pow``:     1 − r^exponent, clipped to [1e-6, 1]
    - ``sigmoid``: (σ(3) − σ(6 r − 3)) / (σ(3) − σ(−3)), clipped to [1e-6, 1] (Show-o's
      ``sigmoid_schedule`` with start = −3, end = 3, tau = 1)

    The clip only matters at r = 1, where :func:`num_to_keep_masked` returns 0 anyway.
    """
    if name not in SCHEDULES:
        raise ValueError(f"mask_schedule: argument 'name' must be one of {list(SCHEDULES)}, got {name!r}")
    r = float(ratio)
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"mask_schedule: argument 'ratio' must be in [0, 1], got {ratio!r}")
    if name == "pow" and not float(exponent) > 0.0:
        raise ValueError(f"mask_schedule: argument 'exponent' must be > 0, got {exponent!r}")
    if name == "cosine":
        return math.cos(math.pi * 0.5 * r)
    if name == "linear":
        g = 1.0 - r
    elif name == "pow":
        g = 1.0 - r ** float(exponent)
    else:  # sigmoid
        sig = lambda z: 1.0 / (1.0 + math.exp(-z))  # noqa: E731
        v_start, v_end = sig(-3.0), sig(3.0)
        g = (v_end - sig(r * 6.0 - 3.0)) / (v_end - v_start)
    return min(max(g, SCHEDULE_CLIP_MIN), 1.0)


def num_to_keep_masked(seq_len: int, step: int, num_steps: int, schedule: str = "cosine", exponent: float = 2.0) -> int:
    """``floor(seq_len · γ((step + 1) / num_steps))`` computed in float64 on the host; 0 at the
    last step (``step == num_steps − 1``). This is the schedule's count before the per-row clamp
    of :func:`masked_sample_step_ref`."""
    for name, v in (("seq_len", seq_len), ("step", step), ("num_steps", num_steps)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"num_to_keep_masked: argument '{name}' must be an int, got {type(v).__name__}")
    seq_len, step, num_steps = int(seq_len), int(step), int(num_steps)
    if seq_len < 0:
        raise ValueError(f"num_to_keep_masked: argument 'seq_len' must be >= 0, got {seq_len}")
    if num_steps < 1:
        raise ValueError(f"num_to_keep_masked: argument 'num_steps' must be >= 1, got {num_steps}")
    if not 0 <= step < num_steps:
        raise ValueError(f"num_to_keep_masked: argument 'step' must be in [0, {num_steps}), got {step}")
    if schedule not in SCHEDULES:
        raise ValueError(f"num_to_keep_masked: argument 'schedule' must be one of {list(SCHEDULES)}, got {schedule!r}")
    if step >= num_steps - 1:
        return 0
    return int(math.floor(seq_len * mask_schedule(schedule, (step + 1) / num_steps, exponent)))


# --------------------------------------------------------------------------------------------
# host scalars and defaults (shared with every backend's host code)


class StepScalars(NamedTuple):
    """The host scalars of one masked step that derive from its schedule (:func:`step_scalars`)."""

    tau: float
    """``confidence_noise · (1 − (step + 1) / num_steps)``, float64 (0: no confidence noise)."""
    n_cap: int
    """The per-row re-mask cap: ``max(n_raw, 1)``, 0 at the last step; a row re-masks
    ``n = max(0, min(n_cap, masked_count − 1))``."""
    last: bool
    """``step == num_steps − 1`` (nothing is re-masked)."""


class StepParams(NamedTuple):
    """The scalar arguments of one masked step as the fast backends take them (built once by the
    custom op from the public arguments; the last three fields are :class:`StepScalars`)."""

    seed: int
    step: int
    mask_token_id: int
    guidance_scale: float
    temperature: float
    top_k: Optional[int]
    tau: float
    n_cap: int
    last: bool


def step_scalars(
    seq_len: int, step: int, num_steps: int, confidence_noise: float, schedule: str = "cosine", exponent: float = 2.0
) -> StepScalars:
    """τ, the re-mask cap and the last-step flag of step ``step`` of ``num_steps`` (docs/model.md §4
    steps 4-5), computed in float64 on the host."""
    last = step == num_steps - 1
    n_cap = 0 if last else max(num_to_keep_masked(seq_len, step, num_steps, schedule, exponent), 1)
    return StepScalars(confidence_noise * (1.0 - (step + 1) / num_steps), n_cap, last)


def row_sample_ids(sample_ids: Optional[Tensor], B: int, device: torch.device) -> Tensor:
    """The RNG sample id of each row: ``sample_ids`` as contiguous int64 on ``device``, or
    ``arange(B)`` when None."""
    if sample_ids is None:
        return torch.arange(B, device=device)
    return sample_ids.to(device=device, dtype=torch.int64).contiguous()


def row_positions(position: Union[int, Tensor], B: int, device: torch.device) -> Tensor:
    """The RNG position word of each row of ``ar_sample``: contiguous int64 ``[B]`` from an int or
    a ``[B]`` tensor."""
    if isinstance(position, Tensor):
        return position.to(device=device, dtype=torch.int64).expand(B).contiguous()
    return torch.full((B,), int(position), dtype=torch.int64, device=device)


# --------------------------------------------------------------------------------------------
# logits pieces (shared with the host pre-passes of the fused backends)


def sanitize_logits(x: Tensor) -> Tensor:
    """fp32 copy of ``x`` with NaN -> -inf and +inf -> FLT_MAX."""
    return torch.nan_to_num(x.float(), nan=float("-inf"), posinf=FLT_MAX, neginf=float("-inf"))


def log_prob(x: Tensor, pick: Tensor) -> Tensor:
    """``log softmax(x)[pick]`` along the last dim of sanitised fp32 ``x`` (``[..., V]``, ``pick``
    ``[...]`` int64), by the exact fixed-point definition of :mod:`.rng`: ``(x_pick - m) - lse_rel``
    with ``m`` the row max; -inf for a row with no finite value."""
    m = x.amax(dim=-1, keepdim=True)
    finite = m > float("-inf")
    m = torch.where(finite, m, 0.0)
    lp = (x.gather(-1, pick[..., None]) - m) - rng.lse_rel(x, m)
    return torch.where(finite, lp, float("-inf"))[..., 0]


def draw_code(z: Tensor, hi: Tensor, lo: Tensor) -> Tensor:
    """The code drawn from ``softmax(z)`` along the last dim of fp32 scores ``z`` (``[R, V]``; -inf:
    excluded) with the 64 random bits ``(hi, lo)`` of each row (int64 ``[R]``), by inverse transform
    on the exact fixed-point probabilities of :mod:`.rng`: ``q = exp_fixed(z - max z)``,
    ``U = floor((hi 2^32 + lo) sum(q) / 2^64)``, the code is the first ``v`` with
    ``q_0 + ... + q_v > U`` (probability ``q_v / sum(q)``). A row whose scores are all -inf draws
    code 0."""
    m = z.amax(dim=-1, keepdim=True)
    live = m > float("-inf")
    q = rng.exp_fixed(z - torch.where(live, m, 0.0), rng.sum_bits(z.shape[-1]))
    c = q.cumsum(dim=-1)
    u = rng.mulhi_u64(hi, lo, c[:, -1])
    pick = torch.searchsorted(c, u[:, None], right=True)[:, 0]
    return torch.where(live[:, 0], pick, 0)


def guidance_factors(guidance_scale: float) -> Tuple[float, float]:
    """``(fp32(1 + s), fp32(s))`` as Python floats: the two factors of the guidance combine."""
    a = float(torch.tensor(1.0 + guidance_scale, dtype=torch.float32))
    return a, float(torch.tensor(guidance_scale, dtype=torch.float32))


def active_uncond(uncond_logits: Optional[Tensor], guidance_scale: float) -> Optional[Tensor]:
    """The unconditional logits when guidance is on (given and ``guidance_scale != 0``), else None."""
    return uncond_logits if uncond_logits is not None and guidance_scale != 0.0 else None


def guided_logits(cond: Tensor, uncond: Optional[Tensor], guidance_scale: float) -> Tensor:
    """Step 1 of the masked step: the sanitised fp32 ``fp32(1 + s)·cond − fp32(s)·uncond`` (two
    fp32 products, then the difference), or the sanitised fp32 ``cond`` when ``uncond`` is None
    (pass :func:`active_uncond`)."""
    if uncond is None:
        return sanitize_logits(cond)
    a, s = (torch.tensor(f, dtype=torch.float32, device=cond.device) for f in guidance_factors(guidance_scale))
    return sanitize_logits(a * cond.float() - s * uncond.float())


def _scale(x: Tensor, temperature: float) -> Tensor:
    t = torch.tensor(temperature, dtype=torch.float32, device=x.device)
    return torch.clamp(x / t, max=FLT_MAX)


def top_k_threshold(x: Tensor, k: int) -> Tensor:
    """The k-th largest value of each row of ``x`` (counting duplicates), ``[..., 1]``, 0 < k <= V:
    top-k keeps exactly the ``x_v >=`` it."""
    return x.topk(k, dim=-1, sorted=True).values[..., -1:]


def top_k_filter(x: Tensor, k: Optional[int]) -> Tensor:
    """Keep ``x_v`` iff it is >= the k-th largest value of its row (ties kept); others -inf.
    ``k`` None or >= V: unchanged."""
    if k is None or k >= x.shape[-1]:
        return x
    return torch.where(x >= top_k_threshold(x, k), x, float("-inf"))


def top_p_filter(x: Tensor, top_p: Optional[float]) -> Tensor:
    """Nucleus filter of fp32 logits ``x`` (``[R, V]``), sort-free and tie-symmetric definition:

    with ``p = softmax(x)`` (fp32), keep v iff ``S_v = Σ_{u : x_u > x_v} p_u < top_p`` -- the
    probability mass of the codes strictly more likely than v (compared on the logits, which is the
    same order as the probabilities without rounding ties) -- else -inf. Tied codes are kept or
    dropped together; the most likely code always survives (S = 0). ``top_p`` None or >= 1: no
    filtering. The reference sums S in float64 (a sort plus prefix sum is only how it is computed;
    the definition needs no sort).
    """
    if top_p is None or top_p >= 1.0:
        return x
    p = torch.softmax(x, dim=-1)
    xs, order = torch.sort(x, dim=-1, descending=True, stable=True)
    ps = p.gather(-1, order).double()
    excl = torch.cumsum(ps, dim=-1) - ps  # mass of everything sorted before j
    V = x.shape[-1]
    j = torch.arange(V, device=x.device).expand_as(xs)
    new_group = torch.ones_like(xs, dtype=torch.bool)
    new_group[..., 1:] = xs[..., 1:] != xs[..., :-1]
    group_start = torch.cummax(torch.where(new_group, j, 0), dim=-1).values
    mass_gt = excl.gather(-1, group_start)  # mass strictly above the tie group
    keep_sorted = mass_gt < top_p
    keep = torch.empty_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return torch.where(keep, x, float("-inf"))


def ar_greedy(temperature: float, top_k: Optional[int]) -> bool:
    """``ar_sample`` is a plain argmax at temperature 0 or with ``top_k == 1``."""
    return temperature == 0 or top_k == 1


def ar_scores(x: Tensor, temperature: float, top_k: Optional[int], top_p: Optional[float]) -> Tensor:
    """The scores ``ar_sample`` takes the Gumbel-max of, from sanitised logits ``x``:
    ``min(x / T, FLT_MAX)``, top-k filtered, then top-p filtered (-inf: dropped)."""
    return top_p_filter(top_k_filter(_scale(x, temperature), top_k), top_p)


def remask(
    confidence: Tensor, is_masked: Tensor, tokens: Tensor, sampled: Tensor, n_cap: int, mask_token_id: int
) -> Tuple[Tensor, Tensor, Tensor]:
    """Steps 5-6 of the masked step on ``[B, L]`` tensors: per row ``n = max(0, min(n_cap,
    masked_count − 1))`` (:class:`StepScalars`), the ``n`` lowest-confidence positions re-masked
    (a stable sort: ties -> lowest position first). Returns ``(tokens, is_masked, sampled)`` with
    ``sampled`` taken at input-masked positions and the input token elsewhere."""
    B, L = confidence.shape
    n = torch.clamp(torch.clamp(is_masked.sum(dim=-1) - 1, max=n_cap), min=0)
    order = torch.sort(confidence, dim=-1, stable=True).indices
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(L, device=confidence.device).expand(B, L).contiguous()
    )
    new_mask = is_masked & (rank < n[:, None])
    tok_in = tokens.to(torch.int64)
    sampled_out = torch.where(is_masked, sampled, tok_in)
    tokens_out = torch.where(new_mask, torch.full_like(tok_in, mask_token_id), sampled_out)
    return tokens_out, new_mask, sampled_out


def _chunks(rows: int, V: int, device: torch.device):
    elems = CHUNK_ELEMS_CUDA if device.type == "cuda" else CHUNK_ELEMS
    step = max(1, elems // max(V, 1))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


# --------------------------------------------------------------------------------------------
# MaskGIT step


def masked_sample_step_ref(
    cond_logits: Tensor,
    tokens: Tensor,
    is_masked: Tensor,
    *,
    step: int,
    num_steps: int,
    seed: int,
    mask_token_id: int,
    uncond_logits: Optional[Tensor] = None,
    guidance_scale: float = 0.0,
    temperature: float = 1.0,
    confidence_noise: float = 4.5,
    schedule: str = "cosine",
    schedule_exponent: float = 2.0,
    top_k: Optional[int] = None,
    sample_ids: Optional[Tensor] = None,
) -> MaskedStepOutput:
    """One MaskGIT step for ``B`` rows of ``L`` positions over ``V`` codes.

    Inputs: ``cond_logits`` (and ``uncond_logits``) ``[B, L, V]`` float (fp32/bf16/fp16),
    ``tokens`` ``[B, L]`` int, ``is_masked`` ``[B, L]`` bool, ``sample_ids`` ``[B]`` int (default
    ``arange(B)``; the RNG uses its low 32 bits). Per row b, position i:

    1. ``x = cond`` if ``uncond_logits`` is None or ``guidance_scale == 0``, else
       ``fp32(1 + s) · cond − fp32(s) · uncond`` in fp32 (two rounded products, then the
       rounded difference: no FMA); then sanitised (NaN -> -inf, +inf -> FLT_MAX).
    2. Top-k filter (if ``top_k``), see the module docstring. ``x`` from here on is filtered.
    3. At every input-masked position: ``temperature > 0``: ``sampled`` is drawn from
       ``softmax(scaled)`` by :func:`draw_code` with the stream-0 draw of (seed, step, sample id,
       i, token 0); ``temperature == 0``: ``argmax_v x_v`` (no noise; ties -> lowest code).
    4. ``confidence = log_softmax(x)[sampled] + fp32(τ) · g'`` (a rounded product, then a rounded
       sum) with ``τ = confidence_noise · (1 − (step + 1) / num_steps)`` (float64 on the host, then
       fp32), ``g'`` the stream-1 Gumbel of (seed, step, sample id, i, 0), ``log_softmax`` the exact
       fixed-point one of :func:`log_prob`. [choice] ``log_softmax`` is of the guided, top-k-filtered
       distribution at temperature 1: the temperature only shapes which code is drawn, so
       temperature 0 is greedy decoding with meaningful confidences. +inf at positions that were
       not masked; -inf where the row had no finite value (its code is 0).
    5. ``n_raw = num_to_keep_masked(L, step, num_steps, schedule, schedule_exponent)``; per row
       ``n = max(0, min(max(n_raw, 1), masked_count − 1))``, and ``n = 0`` at the last step or when
       the row has no masked position.
    6. The ``n`` lowest-confidence positions of the row are re-masked (ties -> lowest position
       first); every other input-masked position takes its sampled code.

    Returns :class:`MaskedStepOutput` (int64 tokens / sampled, bool mask, fp32 confidence).
    """
    B, L, V = cond_logits.shape
    device = cond_logits.device
    sample_ids = row_sample_ids(sample_ids, B, device)
    uncond = active_uncond(uncond_logits, guidance_scale)
    sc = step_scalars(L, step, num_steps, confidence_noise, schedule, schedule_exponent)

    rows = B * L
    cond = cond_logits.reshape(rows, V)
    unc = uncond.reshape(rows, V) if uncond is not None else None
    row_sample = sample_ids.repeat_interleave(L)
    row_pos = torch.arange(L, device=device, dtype=torch.int64).repeat(B)

    sampled = torch.empty(rows, dtype=torch.int64, device=device)
    logp = torch.empty(rows, dtype=torch.float32, device=device)
    for r0, r1 in _chunks(rows, V, device):
        x = top_k_filter(guided_logits(cond[r0:r1], None if unc is None else unc[r0:r1], guidance_scale), top_k)
        if temperature > 0:
            hi, lo = rng.random_words(seed, step, rng.STREAM_TOKEN, row_sample[r0:r1], row_pos[r0:r1], 0)
            pick = draw_code(_scale(x, temperature), hi, lo)
        else:
            pick = x.argmax(dim=-1)
        finite = (x > float("-inf")).any(dim=-1)
        pick = torch.where(finite, pick, 0)
        sampled[r0:r1] = pick
        logp[r0:r1] = log_prob(x, pick)
    sampled = sampled.view(B, L)
    logp = logp.view(B, L)

    confidence = logp
    if sc.tau != 0.0 and B * L > 0:
        pos = torch.arange(L, device=device)[None, :]
        g1 = rng.gumbel(seed, step, rng.STREAM_CONFIDENCE, sample_ids[:, None], pos, 0)
        confidence = logp + torch.tensor(sc.tau, dtype=torch.float32, device=device) * g1
    confidence = torch.where(is_masked, confidence, float("inf"))
    tokens_out, new_mask, sampled_out = remask(confidence, is_masked, tokens, sampled, sc.n_cap, mask_token_id)
    return MaskedStepOutput(tokens_out, new_mask, sampled_out, confidence)


# --------------------------------------------------------------------------------------------
# autoregressive sampling


def ar_sample_ref(
    logits: Tensor,
    *,
    seed: int,
    position: Union[int, Tensor],
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    sample_ids: Optional[Tensor] = None,
) -> ARSample:
    """One autoregressive sampling step: ``logits`` ``[B, V]`` float -> :class:`ARSample`.

    Per row b: ``x`` = sanitised fp32 logits. ``temperature == 0`` or ``top_k == 1``: greedy
    ``argmax x`` (ties -> lowest index). Otherwise ``scaled = min(x / T, FLT_MAX)``, top-k filter
    (see the module docstring), top-p filter (:func:`top_p_filter`, on the tempered, top-k-filtered
    distribution), then a code drawn from ``softmax`` of what is left by :func:`draw_code` with the
    stream-0 draw of (seed, step 0, sample id, position[b], token 0); ``position`` is an int or a
    ``[B]`` int tensor (the decode step, a 32-bit word). ``logprobs = log_softmax(x)[token]`` (:func:`log_prob`;
    temperature 1, unfiltered).
    A row with no finite logit gives token 0 and logprob -inf.
    """
    B, V = logits.shape
    device = logits.device
    sample_ids = row_sample_ids(sample_ids, B, device)
    pos = row_positions(position, B, device)
    greedy = ar_greedy(temperature, top_k)

    tokens = torch.empty(B, dtype=torch.int64, device=device)
    logprobs = torch.empty(B, dtype=torch.float32, device=device)
    for r0, r1 in _chunks(B, V, device):
        x = sanitize_logits(logits[r0:r1])
        if greedy:
            pick = x.argmax(dim=-1)
        else:
            hi, lo = rng.random_words(seed, 0, rng.STREAM_TOKEN, sample_ids[r0:r1], pos[r0:r1], 0)
            pick = draw_code(ar_scores(x, temperature, top_k, top_p), hi, lo)
        finite = (x > float("-inf")).any(dim=-1)
        pick = torch.where(finite, pick, 0)
        tokens[r0:r1] = pick
        logprobs[r0:r1] = log_prob(x, pick)
    return ARSample(tokens, logprobs)
