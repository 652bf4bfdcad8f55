"""The case matrix of the sm_90a compile check (scripts/check_triton_sm90.py): every Triton
launcher of ``unif2ace.kernels.triton`` called on ``meta`` tensors (shapes and dtypes only, no
memory) at shapes from decode size to paper size, in every dtype and every variant.

A case only *calls the launcher*; what it compiles -- kernels, configs, constexprs, argument
types and specialisations -- comes from the launcher's own planning code through
:func:`unif2ace.kernels.triton._launch.record`. Nothing here repeats a kernel signature. Adding a
kernel or a variant to a launcher means adding the inputs that reach it here (and the check's
coverage test, tests/test_triton_sm90.py, fails when a config table entry is never reached).

The D3Diff parametrisations (posterior / raw / RADD) and reductions are assembled in PyTorch from
the row kernels' ``[N]`` outputs: they compile nothing and have no case here.

Paper-size shapes (issue 16): fused head N=8192 D=2304 V=256000; MoE T=16384 D=2048 F=1024 E=16
(2 groups of 8) k=2; AR B=64 V=256000; masked step B=8 L=4096 V=8192.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Case:
    """One launcher call: ``call()`` runs it on meta tensors (inside ``record()``)."""

    stem: str
    entry: str  # the launcher (and direction) called
    dtype: Optional[str]  # the data dtype of the call (None: no float data)
    variant: Tuple[Tuple[str, Any], ...]  # the variant flags, sorted
    shape: str  # a short label of the sizes
    call: Callable[[], Any]

    @property
    def variant_label(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.variant) or "-"


def _m(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def _case(stem, entry, dtype, shape, call, **variant) -> Case:
    return Case(stem, entry, dtype, tuple(sorted(variant.items())), shape, call)


# ------------------------------------------------------------------------------------- d3diff

# every vocabulary tile the row kernels can pick (BLOCK_V = pow2 in [16, 4096]) plus real vocabularies
_ROW_VOCABS = [13, 17, 33, 100, 200, 500, 1000, 2000, 4000, 8192, 58498, 256000]


def d3diff_cases() -> List[Case]:
    from unif2ace.kernels.triton import d3diff as k

    out = []
    for dn, dt in DTYPES.items():
        for V in _ROW_VOCABS:
            for tdt in ("int64", "int32") if V in (1000, 256000) else ("int64",):
                N = 8192 if V >= 8192 else 64
                shape = f"N={N} V={V}"

                def fwd(N=N, V=V, dt=dt, tdt=tdt):
                    k.lse_gather(_m(N, V, dtype=dt), _m(N, dtype=getattr(torch, tdt)), -100)

                def bwd(N=N, V=V, dt=dt, tdt=tdt):
                    f = _m(N)
                    k.lse_gather_backward(_m(N, V, dtype=dt), _m(N, dtype=getattr(torch, tdt)), f, f, f, f, -100)

                out.append(_case("d3diff", "lse_gather", dn, shape, fwd, target=tdt))
                out.append(_case("d3diff", "lse_gather_backward", dn, shape, bwd, target=tdt))
    return out


# -------------------------------------------------------------------------------- d3diff_head

_HEAD_SHAPES = [(256, 512, 8192, "decode N=256 D=512 V=8192"), (8192, 2304, 256000, "paper N=8192 D=2304 V=256000")]


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def d3diff_head_cases() -> List[Case]:
    from unif2ace.kernels.triton import d3diff_head as k

    out = []
    for dn, dt in DTYPES.items():
        for N, D, V, shape in _HEAD_SHAPES:
            for bias in (True, False):
                precs = (False, True) if dn == "fp32" else (False,)
                precise_opts = (True, False) if dn != "fp32" else (False,)
                for tf32 in precs:
                    extra = dict(tf32=tf32) if dn == "fp32" else {}

                    def inputs(N=N, D=D, V=V, dt=dt, bias=bias):
                        return (
                            _m(N, D, dtype=dt),
                            _m(V, D, dtype=dt),
                            (_m(V, dtype=dt) if bias else None),
                            _m(N, dtype=torch.int64),
                        )

                    def fwd(inputs=inputs, tf32=tf32):
                        with _tf32(tf32):
                            k.head_lse_gather(*inputs(), -100)

                    out.append(_case("d3diff_head", "fwd", dn, shape, fwd, bias=bias, **extra))
                    for precise in precise_opts:
                        pv = dict(precise=precise) if dn != "fp32" else {}
                        for det in (True, False):

                            def bwd(inputs=inputs, N=N, tf32=tf32, det=det, precise=precise):
                                f = _m(N)
                                with _tf32(tf32):
                                    k.head_lse_gather_backward(
                                        *inputs(), f, f, f, f, -100, deterministic=det, precise_grad=precise
                                    )

                            entry = "bwd" if det else "bwd_atomic"
                            out.append(_case("d3diff_head", entry, dn, shape, bwd, bias=bias, **extra, **pv))
    return out


# -------------------------------------------------------------------------------- moe_gating

# (T, group sizes, k, label): paper routing, the model's default k=4, sequence-level gating, decode,
# and wide groups up to the one-tile limit (MAX_GROUP_EXPERTS = 1024)
_GATING_SHAPES = [
    (16384, [8, 8], 2, "paper T=16384 E=2x8 k=2"),
    (16384, [8, 8], 4, "T=16384 E=2x8 k=4"),
    (64, [4, 4], 2, "seq gating B=64 E=2x4 k=2"),
    (5, [8, 8], 1, "decode T=5 E=2x8 k=1"),
    (16384, [64, 64], 2, "T=16384 E=2x64 k=2"),
    (4096, [1024], 8, "T=4096 E=1x1024 k=8"),
]


def moe_gating_cases() -> List[Case]:
    from unif2ace.kernels.triton import moe_gating as k

    out = []
    for dn, dt in DTYPES.items():
        for T, sizes, topk, shape in _GATING_SHAPES:
            for score in ("softmax", "sigmoid"):
                for renorm in (False, True):
                    for gdt in ("int64", "int32") if shape.startswith("paper") else ("int64",):
                        E = sum(sizes)

                        def fwd(T=T, E=E, sizes=sizes, topk=topk, dt=dt, score=score, renorm=renorm, gdt=gdt):
                            k.moe_gating(
                                _m(T, E, dtype=dt), _m(T, dtype=getattr(torch, gdt)), sizes, topk, score, renorm
                            )

                        def bwd(T=T, E=E, sizes=sizes, topk=topk, dt=dt, score=score, renorm=renorm, gdt=gdt):
                            z = _m(T, E, dtype=dt)
                            g = _m(T, dtype=getattr(torch, gdt))
                            k.moe_gating_backward(_m(T, topk), _m(E), _m(len(sizes)), z, g, sizes, topk, score, renorm)

                        v = dict(score=score, renorm=renorm, group_ids=gdt)
                        out.append(_case("moe_gating", "fwd", dn, shape, fwd, **v))
                        out.append(_case("moe_gating", "bwd", dn, shape, bwd, **v))
    return out


# ------------------------------------------------------------------------------- moe_routing


def moe_routing_cases() -> List[Case]:
    from unif2ace.kernels.triton import moe_routing as k

    out = []
    for T, topk, E, bs in [(16384, 2, 16, 64), (64, 2, 16, 16), (4096, 8, 1024, 64), (100, 1, 40, 1)]:
        for idt in ("int32", "int64"):

            def call(T=T, topk=topk, E=E, bs=bs, idt=idt):
                k.moe_align(_m(T, topk, dtype=getattr(torch, idt)), E, bs)

            out.append(_case("moe_routing", "moe_align", None, f"T={T} k={topk} E={E} block={bs}", call, ids=idt))
    return out


# ----------------------------------------------------------------------------------- moe_mlp

# (T, D, F, E, k, label): the tile table's shape classes (rows per expert <= 16 / <= 1024 / more)
_MLP_SHAPES = [
    (64, 2048, 1024, 16, 2, "decode T=64 D=2048 F=1024 E=16 k=2"),
    (2048, 2048, 1024, 16, 2, "medium T=2048 D=2048 F=1024 E=16 k=2"),
    (16384, 2048, 1024, 16, 2, "paper T=16384 D=2048 F=1024 E=16 k=2"),
]


def moe_mlp_cases() -> List[Case]:
    from unif2ace.kernels.triton import moe_mlp as k

    out = []
    for dn, dt in DTYPES.items():
        for T, D, F, E, topk, shape in _MLP_SHAPES:
            for act in ("gelu", "gelu_tanh", "swiglu"):
                for bias in (True, False):
                    F1 = 2 * F if act == "swiglu" else F

                    def inputs(T=T, D=D, F=F, E=E, topk=topk, dt=dt, bias=bias, F1=F1):
                        x, w1, w2 = _m(T, D, dtype=dt), _m(E, D, F1, dtype=dt), _m(E, F, D, dtype=dt)
                        ids, gates = _m(T, topk, dtype=torch.int32), _m(T, topk)
                        b1 = _m(E, F1, dtype=dt) if bias else None
                        b2 = _m(E, D, dtype=dt) if bias else None
                        return x, w1, w2, ids, gates, b1, b2

                    for tf32 in (False, True) if dn == "fp32" else (False,):
                        extra = dict(tf32=tf32) if dn == "fp32" else {}

                        def fwd(inputs=inputs, act=act, tf32=tf32):
                            with _tf32(tf32):
                                k.moe_expert_mlp(*inputs(), act)

                        def bwd(inputs=inputs, act=act, T=T, D=D, dt=dt, tf32=tf32):
                            with _tf32(tf32):
                                k.moe_expert_mlp_backward(_m(T, D, dtype=dt), *inputs(), act)

                        out.append(_case("moe_mlp", "fwd", dn, shape, fwd, act=act, bias=bias, **extra))
                        out.append(_case("moe_mlp", "bwd", dn, shape, bwd, act=act, bias=bias, **extra))
    return out


# ---------------------------------------------------------------------------------- sampling


def _step_params(L: int, top_k, guidance: float, temperature: float, tau: float, last: bool):
    from unif2ace.kernels.reference.sampling import StepParams

    return StepParams(
        seed=1234,
        step=3,
        mask_token_id=8192,
        guidance_scale=guidance,
        temperature=temperature,
        top_k=top_k,
        tau=tau,
        n_cap=0 if last else max(L // 3, 1),
        last=last,
    )


# every remask tile (BLOCK_L = pow2 in [16, 4096]); kernel A at a tiny vocabulary alongside
_REMASK_LENGTHS = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


def sampling_cases() -> List[Case]:
    from unif2ace.kernels.triton import sampling as k

    out = []
    step_variants = [
        dict(guidance=0.0, top_k=None, temperature=1.0, tau=4.5, last=False),  # plain, confidence noise
        dict(guidance=3.0, top_k=None, temperature=1.0, tau=0.0, last=False),  # guidance, no noise
        dict(guidance=3.0, top_k=50, temperature=1.0, tau=4.5, last=False),  # guidance + top-k
        dict(guidance=0.0, top_k=None, temperature=0.0, tau=0.0, last=True),  # greedy, last step
    ]
    step_shapes = [(8, 4096, 8192, "paper B=8 L=4096 V=8192"), (1, 256, 8192, "decode B=1 L=256 V=8192")]
    step_shapes += [(1, L, 16, f"remask sweep B=1 L={L} V=16") for L in _REMASK_LENGTHS if L not in (256, 4096)]
    for dn, dt in DTYPES.items():
        for B, L, V, shape in step_shapes:
            for sv in step_variants if V > 16 else step_variants[:1]:

                def step(B=B, L=L, V=V, dt=dt, sv=sv):
                    p = _step_params(L, sv["top_k"], sv["guidance"], sv["temperature"], sv["tau"], sv["last"])
                    unc = _m(B, L, V, dtype=dt) if sv["guidance"] else None
                    tok = _m(B, L, dtype=torch.int64)
                    k.masked_sample_step(_m(B, L, V, dtype=dt), tok, _m(B, L, dtype=torch.bool), unc, None, p)

                variant = dict(
                    guidance=sv["guidance"] != 0,
                    top_k=sv["top_k"] is not None,
                    greedy=sv["temperature"] == 0,
                    noise=sv["tau"] != 0,
                    last=sv["last"],
                )
                out.append(_case("sampling", "masked_sample_step", dn, shape, step, **variant))
        ar_variants = [
            dict(temperature=1.0, top_k=None, top_p=None),
            dict(temperature=0.0, top_k=None, top_p=None),
            dict(temperature=0.8, top_k=50, top_p=None),
            dict(temperature=0.8, top_k=None, top_p=0.9),
        ]
        for B, V, shape in [
            (64, 256000, "paper B=64 V=256000"),
            (1, 58498, "decode B=1 V=58498"),
            (4, 1000, "B=4 V=1000"),
        ]:
            for av in ar_variants:

                def ar(B=B, V=V, dt=dt, av=av):
                    k.ar_sample(_m(B, V, dtype=dt), seed=7, position=3, **av)

                variant = dict(
                    greedy=av["temperature"] == 0, top_k=av["top_k"] is not None, top_p=av["top_p"] is not None
                )
                out.append(_case("sampling", "ar_sample", dn, shape, ar, **variant))
    return out


def rng_cases() -> List[Case]:
    from unif2ace.kernels.triton import rng as k

    def call():
        w = _m(4096, dtype=torch.int64)
        k.gumbel_from_words(w, w)

    return [_case("rng", "gumbel_from_words", None, "N=4096", call)]


STEMS: Dict[str, Callable[[], List[Case]]] = {
    "d3diff": d3diff_cases,
    "d3diff_head": d3diff_head_cases,
    "moe_gating": moe_gating_cases,
    "moe_routing": moe_routing_cases,
    "moe_mlp": moe_mlp_cases,
    "sampling": sampling_cases,
    "rng": rng_cases,
}


def all_cases(stems: Optional[List[str]] = None) -> List[Case]:
    out: List[Case] = []
    for stem, fn in STEMS.items():
        if stems is None or stem in stems:
            out.extend(fn())
    return out
