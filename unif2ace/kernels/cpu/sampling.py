"""cpu backend of the sampling ops: host glue of csrc/cpu/sampling.cpp
(``torch.ops.unif2ace_cpu.masked_sample_step`` / ``ar_sample``).

The host scalars (:class:`~unif2ace.kernels.reference.sampling.StepParams`: τ, the re-mask cap,
the last-step flag), the seed and step halves and the sample-id / position defaults come from the
reference's helpers; everything else (the RNG keys included) runs in C++.
"""

from __future__ import annotations

from .. import _ext
from ..reference import rng as _rng
from ..reference import sampling as _ref

__all__ = ["masked_sample_step", "ar_sample"]


def masked_sample_step(cond_logits, tokens, is_masked, uncond_logits, sample_ids, p: _ref.StepParams):
    """One MaskGIT step (``masked_sample_step_ref`` semantics) with the scalars ``p``."""
    unc = _ref.active_uncond(uncond_logits, p.guidance_scale)
    if unc is not None and unc.dtype != cond_logits.dtype:  # mixed dtypes: both to fp32 (exact)
        cond_logits, unc = cond_logits.float(), unc.float()
    ids = _ref.row_sample_ids(sample_ids, cond_logits.shape[0], cond_logits.device)
    out = _ext.cpu_ops().masked_sample_step(
        cond_logits,
        unc,
        tokens.long(),
        is_masked,
        ids,
        *_rng.split_seed(p.seed),
        *_rng.split_step(p.step),
        float(p.guidance_scale),
        float(p.temperature),
        float(p.tau),  # float64 on the host, as the reference
        p.top_k or 0,
        p.n_cap,
        p.mask_token_id,
    )
    return _ref.MaskedStepOutput(*out)


def ar_sample(logits, *, seed, position, temperature=1.0, top_k=None, top_p=None, sample_ids=None, logprobs=True):
    """One autoregressive sampling step (``ar_sample_ref`` semantics). ``logprobs=False``: the
    log-probabilities are not formed (NaN in their place) and the exact temperature-1 row sum is
    skipped unless the draw is taken from it (unfiltered at temperature 1)."""
    B = logits.shape[0]
    ids = _ref.row_sample_ids(sample_ids, B, logits.device)
    pos = _ref.row_positions(position, B, logits.device)
    seed_lo, seed_hi = _rng.split_seed(seed)
    top_p = 1.0 if top_p is None else float(top_p)
    T = float(temperature)
    out = _ext.cpu_ops().ar_sample(logits, ids, pos, seed_lo, seed_hi, T, top_k or 0, top_p, bool(logprobs))
    return _ref.ARSample(*out)
