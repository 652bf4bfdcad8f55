"""Peers: what a user would run instead of unif2ace, timed in the same run as our backends.

Every peer computes the same math as the case it is attached to (tests/test_benchmark_peers.py
checks it against our reference wherever the peer runs on this machine):

loss (``d3diff_loss`` with α = 0, i.e. mean cross-entropy over the rows whose target is not
``ignore_index``; the same rows are ignored by every peer):
    ``cce-torch_compile`` / ``cce``  Cut Cross-Entropy's ``linear_cross_entropy`` (``impl=
                                      "torch_compile"`` anywhere, ``impl="cce"`` Triton, CUDA only;
                                      its default gradient filter, as users run it, skips
                                      negligible softmax entries in the backward)
    ``liger-flce``                    Liger-Kernel's fused linear cross-entropy (Triton, CUDA only)
    ``eager``                         ``F.cross_entropy(F.linear(h, w).float(), target)``
    (from logits: ``eager`` ``F.cross_entropy(logits.float(), target)``, ``liger-ce`` on CUDA)
grouped MoE MLP (``moe_expert_mlp``): tokens sorted by expert, then
    ``torch._grouped_mm``             one grouped GEMM per projection (where this torch has it)
    ``torch.mm-loop``                 a Python loop over experts with ``torch.mm``
sampling:
    ``torch-native``  the sampler serving stacks fall back to without FlashInfer (vLLM's
                      ``forward_native``): temperature, top-k / top-p by a full sort, then the
                      exponential race ``argmax(probs / Exp(1))``; for the MaskGIT step the same
                      draw inside the step (guidance, confidence, re-masking as ours)
    ``flashinfer``    FlashInfer's sorting-free sampling kernels (CUDA only)

A peer that is not installed, or cannot run on this device, raises ``BackendUnavailableError``
on its first call: the runner reports a skipped row with the reason; nothing here is a hard
dependency. Install them with ``pip install --no-deps -r requirements-peers.txt``.
"""

from __future__ import annotations

import importlib
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from unif2ace.kernels import BackendUnavailableError

IGNORE_INDEX = -100
INSTALL_HINT = "pip install --no-deps -r requirements-peers.txt"
_IMPORTS: Dict[str, object] = {}


def _need(module: str, dist: str):
    """Import ``module`` (of the PyPI package ``dist``) or raise BackendUnavailableError."""
    if module not in _IMPORTS:
        try:
            _IMPORTS[module] = importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - not installed, or broken against this torch/triton
            msg = str(e).strip().splitlines()
            _IMPORTS[module] = BackendUnavailableError(
                f"{dist} not installed ({INSTALL_HINT})"
                if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] == module.split(".")[0]
                else f"{dist} failed to import: {type(e).__name__}: {msg[0] if msg else ''}"
            )
    mod = _IMPORTS[module]
    if isinstance(mod, BackendUnavailableError):
        raise mod
    return mod


def _cuda_only(t: torch.Tensor, what: str) -> None:
    if t.device.type != "cuda":
        raise BackendUnavailableError(f"{what} runs on CUDA tensors only")


# --------------------------------------------------------------------------------------------
# loss


def cce_loss(impl: str) -> Callable:
    """Cut Cross-Entropy ``linear_cross_entropy(hidden, weight, target, impl=impl)``."""

    def fn(inp):
        if impl == "cce":
            _cuda_only(inp["hidden"], "CCE's cce implementation (Triton)")
        cce = _need("cut_cross_entropy", "cut-cross-entropy")
        loss = cce.linear_cross_entropy(
            inp["hidden"], inp["weight"], inp["target"], ignore_index=IGNORE_INDEX, reduction="mean", impl=impl
        )
        return (loss,)

    return fn


def liger_flce(inp):
    """Liger-Kernel's fused linear cross-entropy (chunked, Triton; CUDA only)."""
    _cuda_only(inp["hidden"], "Liger-Kernel (Triton)")
    lf = _need("liger_kernel.transformers.functional", "liger-kernel")
    loss = lf.liger_fused_linear_cross_entropy(
        inp["hidden"], inp["weight"], inp["target"], ignore_index=IGNORE_INDEX, reduction="mean"
    )
    return (loss,)


def eager_linear_ce(inp):
    """What a model does without a fused head: the logits in memory, cross-entropy in fp32."""
    logits = F.linear(inp["hidden"], inp["weight"])
    return (F.cross_entropy(logits.float(), inp["target"], ignore_index=IGNORE_INDEX),)


def eager_ce(inp):
    return (F.cross_entropy(inp["logits"].float(), inp["target"], ignore_index=IGNORE_INDEX),)


def liger_ce(inp):
    _cuda_only(inp["logits"], "Liger-Kernel (Triton)")
    lf = _need("liger_kernel.transformers.functional", "liger-kernel")
    return (lf.liger_cross_entropy(inp["logits"], inp["target"], ignore_index=IGNORE_INDEX),)


def loss_peers(fused: bool) -> Dict[str, Callable]:
    """Peers of the CE-equivalent loss cases (α = 0): inputs hidden/weight (``fused``) or logits, target."""
    if fused:
        return {
            "cce-torch_compile": cce_loss("torch_compile"),
            "cce": cce_loss("cce"),
            "liger-flce": liger_flce,
            "eager": eager_linear_ce,
        }
    return {"liger-ce": liger_ce, "eager": eager_ce}


# --------------------------------------------------------------------------------------------
# grouped MoE MLP


def _act(h: torch.Tensor, activation: str, F_: int) -> torch.Tensor:
    if activation == "gelu":
        return F.gelu(h)
    if activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if activation == "swiglu":
        return F.silu(h[..., :F_]) * h[..., F_:]
    raise ValueError(activation)


def _dispatch(x, expert_ids, E):
    """(rows of x sorted by expert, token of each sorted row, slot order, rows per expert)."""
    k = expert_ids.shape[1]
    flat = expert_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E)
    tok = order // k
    return x[tok], tok, order, counts


def _combine(y, tok, order, gates, T, dtype):
    """out[t] = sum_j gates[t, j] * y(slot t, j), accumulated in fp32 (as the reference)."""
    g = gates.reshape(-1)[order].float()
    out = torch.zeros(T, y.shape[1], dtype=torch.float32, device=y.device)
    out.index_add_(0, tok, y.float() * g[:, None])
    return out.to(dtype)


def moe_mm_loop(activation: str) -> Callable:
    """Per-expert loop with ``torch.mm`` (as HF-style MoE blocks do), in the inputs' dtype."""

    def fn(inp):
        x, w1, w2 = inp["x"], inp["w1"], inp["w2"]
        E, F_ = w1.shape[0], w2.shape[1]
        xs, tok, order, counts = _dispatch(x, inp["expert_ids"], E)
        ys, start = [], 0
        for e, c in enumerate(counts.tolist()):
            if c:
                h = _act(torch.mm(xs[start : start + c], w1[e]), activation, F_)
                ys.append(torch.mm(h, w2[e]))
            start += c
        y = torch.cat(ys) if ys else xs.new_zeros(0, w2.shape[2])
        return _combine(y, tok, order, inp["gates"], x.shape[0], x.dtype)

    return fn


_GROUPED_OK: Dict[tuple, Optional[str]] = {}


def _grouped_mm_usable(device: torch.device, dtype: torch.dtype) -> None:
    """Raise BackendUnavailableError unless ``torch._grouped_mm`` runs here (probed once)."""
    key = (device.type, dtype)
    if key not in _GROUPED_OK:
        why = None
        if not hasattr(torch, "_grouped_mm"):
            why = f"torch {torch.__version__} has no torch._grouped_mm"
        else:
            try:
                a = torch.zeros(32, 16, device=device, dtype=dtype)
                b = torch.zeros(2, 16, 16, device=device, dtype=dtype)
                torch._grouped_mm(a, b, offs=torch.tensor([16, 32], device=device, dtype=torch.int32))
            except Exception as e:  # noqa: BLE001 - unsupported device / dtype / GPU generation
                msg = str(e).strip().splitlines()
                why = f"torch._grouped_mm unsupported here ({device.type}, {dtype}): {msg[0][:160] if msg else ''}"
        _GROUPED_OK[key] = why
    if _GROUPED_OK[key]:
        raise BackendUnavailableError(_GROUPED_OK[key])


def moe_grouped_mm(activation: str) -> Callable:
    """Tokens sorted by expert, one ``torch._grouped_mm`` per projection."""

    def fn(inp):
        x, w1, w2 = inp["x"], inp["w1"], inp["w2"]
        _grouped_mm_usable(x.device, x.dtype)
        E, F_ = w1.shape[0], w2.shape[1]
        xs, tok, order, counts = _dispatch(x, inp["expert_ids"], E)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        h = _act(torch._grouped_mm(xs, w1, offs=offs), activation, F_)
        y = torch._grouped_mm(h, w2, offs=offs)
        return _combine(y, tok, order, inp["gates"], x.shape[0], x.dtype)

    return fn


def moe_mlp_peers(activation: str) -> Dict[str, Callable]:
    return {"torch._grouped_mm": moe_grouped_mm(activation), "torch.mm-loop": moe_mm_loop(activation)}


# --------------------------------------------------------------------------------------------
# sampling


def top_k_top_p_sort(x: torch.Tensor, top_k: Optional[int], top_p: Optional[float]) -> torch.Tensor:
    """vLLM's ``apply_top_k_top_p``: one ascending sort; top-k keeps the logits >= the k-th largest,
    top-p drops the sorted prefix whose cumulative probability is <= 1 - p (keeping the top one)."""
    if not top_k and (top_p is None or top_p >= 1.0):
        return x
    V = x.shape[-1]
    xs, idx = x.sort(dim=-1, descending=False)
    if top_k and top_k < V:
        kth = xs[..., V - top_k : V - top_k + 1]
        xs = xs.masked_fill(xs < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        cum = xs.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= 1 - top_p
        drop[..., -1] = False
        xs = xs.masked_fill(drop, float("-inf"))
    return xs.scatter(-1, idx, xs)


def exponential_race(probs: torch.Tensor, generator=None) -> torch.Tensor:
    """``argmax(probs / q)``, q ~ Exp(1) i.i.d.: one draw per row from ``probs`` (no sort, no CDF)."""
    q = torch.empty_like(probs).exponential_(generator=generator)
    return probs.div(q).argmax(dim=-1)


def native_ar_sample(logits, temperature: float, top_k: Optional[int], top_p: Optional[float], generator=None):
    x = logits.float()
    if temperature == 0:
        return x.argmax(dim=-1)
    x = top_k_top_p_sort(x / temperature, top_k, top_p)
    return exponential_race(x.softmax(dim=-1), generator)


def flashinfer_ar_sample(logits, temperature: float, top_k: Optional[int], top_p: Optional[float]):
    _cuda_only(logits, "FlashInfer")
    fi = _need("flashinfer.sampling", "flashinfer-python")
    x = logits.float() / temperature if temperature > 0 else logits.float()
    if temperature == 0:
        return x.argmax(dim=-1)
    if top_p is not None and top_p < 1.0:
        return fi.top_k_top_p_sampling_from_logits(x, top_k or x.shape[-1], top_p)
    if top_k:
        return fi.top_k_sampling_from_probs(x.softmax(dim=-1), top_k)
    return fi.sampling_from_logits(x)


def ar_sample_peers(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> Dict[str, Callable]:
    return {
        "torch-native": lambda inp: native_ar_sample(inp["logits"], temperature, top_k, top_p),
        "flashinfer": lambda inp: flashinfer_ar_sample(inp["logits"], temperature, top_k, top_p),
    }


def native_masked_step(
    cond,
    uncond,
    tokens,
    is_masked,
    *,
    step,
    num_steps,
    guidance_scale,
    confidence_noise,
    mask_token_id,
    schedule="cosine",
    generator=None,
):
    """One MaskGIT step with the serving stacks' draw: guidance combine, ``log_softmax``, the
    exponential race per position, confidence = log p(sampled) + τ·Gumbel, the ``n`` least
    confident positions re-masked (our schedule's ``n``: the same decisions as ours, other noise)."""
    from unif2ace.kernels.reference.sampling import num_to_keep_masked

    B, L, V = cond.shape
    s = guidance_scale
    x = (1 + s) * cond.float() - s * uncond.float() if uncond is not None and s else cond.float()
    logp = x.log_softmax(dim=-1)
    sampled = exponential_race(logp.exp(), generator)
    conf = logp.gather(-1, sampled[..., None])[..., 0]
    tau = confidence_noise * (1.0 - (step + 1) / num_steps)
    if tau:
        u = torch.rand(B, L, device=cond.device, generator=generator).clamp_(min=1e-20)
        conf = conf + tau * -torch.log(-torch.log(u))
    conf = torch.where(is_masked, conf, float("inf"))
    masked_count = is_masked.sum(dim=-1)
    if step == num_steps - 1:
        n = torch.zeros_like(masked_count)
    else:
        n_raw = num_to_keep_masked(L, step, num_steps, schedule)
        n = torch.clamp(torch.clamp(masked_count - 1, max=max(n_raw, 1)), min=0)
    rank = torch.sort(conf, dim=-1, stable=True).indices.argsort(dim=-1)
    new_mask = is_masked & (rank < n[:, None])
    sampled_out = torch.where(is_masked, sampled, tokens.long())
    return torch.where(new_mask, mask_token_id, sampled_out), new_mask


def masked_step_peers(
    *, step: int, num_steps: int, guidance_scale: float, confidence_noise: float, mask_token_id: int
) -> Dict[str, Callable]:
    def fn(inp):
        return native_masked_step(
            inp["cond"],
            inp.get("uncond"),
            inp["tokens"],
            inp["is_masked"],
            step=step,
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            confidence_noise=confidence_noise,
            mask_token_id=mask_token_id,
        )

    return {"torch-native": fn}
