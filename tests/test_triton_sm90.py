"""The sm_90a compile check (scripts/check_triton_sm90.py, docs/testing.md): the planners it
drives, its analysis and its verdict logic, and the check itself (compiled in a subprocess:
this process runs the kernels under TRITON_INTERPRET=1, where @triton.jit functions are
interpreter objects that cannot be compiled)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unif2ace.kernels.triton import _launch, moe_mlp, moe_routing
from unif2ace.kernels.triton import d3diff_head as head
from unif2ace.testing import triton_sm90 as chk
from unif2ace.testing.triton_sm90_cases import STEMS, all_cases
from unif2ace.testing.triton_sm90_known import KNOWN

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------- the planners


@pytest.fixture(scope="module")
def recorded():
    """Every case's planned launches (the planning code under record(), no compile)."""
    out = []
    for case in all_cases():
        with _launch.record() as launches:
            case.call()
        out.append((case, list(launches)))
    return out


def test_every_case_plans(recorded):
    assert len(recorded) > 300
    kernels = {ln.name for _, lns in recorded for ln in lns}
    # every @triton.jit kernel with a launcher in unif2ace/kernels/triton is reached
    expected = {"_lse_gather_fwd_kernel", "_lse_gather_bwd_kernel", "_fwd_kernel", "_bwd_dh_kernel", "_bwd_dw_kernel"}
    expected |= {"_bwd_atomic_kernel", "_gating_fwd_kernel", "_gating_stats_kernel", "_gating_bwd_kernel"}
    expected |= {"_align_count_kernel", "_align_scan_kernel", "_align_blocks_kernel", "_align_scatter_kernel"}
    expected |= {"_mlp_up_kernel", "_gather_gemm_kernel", "_combine_kernel", "_mlp_bwd_act_kernel"}
    expected |= {"_grouped_xty_kernel", "_masked_step_kernel", "_remask_kernel", "_gumbel_words_kernel"}
    expected |= {"_ar_max_kernel", "_ar_sum_kernel", "_ar_pick_kernel"}
    assert kernels == expected


def _launched_jit_kernels():
    """Names of the @triton.jit functions that some launcher passes to launch() (by source scan)."""
    import re

    names = set()
    for f in (ROOT / "unif2ace" / "kernels" / "triton").glob("*.py"):
        names |= set(re.findall(r"Launch\(\s*(_\w+_kernel)\b", f.read_text()))
    return names


def test_no_kernel_is_launched_outside_launch():
    """Every kernel goes through launch() (so the check sees it): no ``kernel[grid](...)`` left."""
    import re

    for f in (ROOT / "unif2ace" / "kernels" / "triton").glob("*.py"):
        if f.name == "_launch.py":
            continue
        assert not re.search(r"\b_\w+_kernel\[", f.read_text()), f"{f.name} launches a kernel directly"
    assert len(_launched_jit_kernels()) == 24


def _configs(recorded, kernel):
    return {
        (tuple(sorted((k, v) for k, v in ln.constexprs.items() if k.startswith("BLOCK_"))), ln.options.get("num_warps"))
        for _, lns in recorded
        for ln in lns
        if ln.name == kernel
    }


def test_matrix_reaches_every_gpu_config_table_entry(recorded):
    """The full matrix reaches every entry of the launchers' GPU config tables."""
    head_kernels = dict(fwd="_fwd_kernel", dh="_bwd_dh_kernel", dw="_bwd_dw_kernel", atomic="_bwd_atomic_kernel")
    assert set(head_kernels) == set(head.KERNELS)
    for (kernel, *_), cfg in head._CONFIGS.items():
        key = (
            tuple(sorted(dict(BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k).items())),
            cfg.num_warps,
        )
        assert key in _configs(recorded, head_kernels[kernel]), (kernel, cfg)
    got = _configs(recorded, "_mlp_up_kernel")
    for name, cfg in moe_mlp.MLP_CONFIGS.items():
        if name == "interpret":
            continue
        key = (tuple(sorted((k, v) for k, v in cfg.items() if k.startswith("BLOCK_"))), cfg["num_warps"])
        assert key in got, name
    got = _configs(recorded, "_align_count_kernel")
    gpu = moe_routing.ALIGN_CONFIGS["gpu"]
    assert any(dict(c)["BLOCK_N"] == gpu["BLOCK_N"] and dict(c)["BLOCK_E"] == gpu["BLOCK_E"] for c, _ in got)
    # every tile a size-derived planner can pick
    assert {dict(c)["BLOCK_V"] for c, _ in _configs(recorded, "_lse_gather_fwd_kernel")} == {2**i for i in range(4, 13)}
    assert {dict(c)["BLOCK_L"] for c, _ in _configs(recorded, "_remask_kernel")} == {2**i for i in range(4, 13)}


def test_fp32_dots_follow_the_tf32_setting(recorded):
    """Plain fp32 calls of the GEMM kernels (fused head, expert MLP) honour
    torch.set_float32_matmul_precision("high") on the GPU as torch.mm does: TF32 dots when
    ``torch.backends.cuda.matmul.allow_tf32`` is set, IEEE fp32 otherwise (issue 16 item 4)."""
    seen = {}
    for case, launches in recorded:
        variant = dict(case.variant)
        if case.stem not in ("d3diff_head", "moe_mlp") or case.dtype != "fp32":
            continue
        precs = {ln.constexprs[k] for ln in launches for k in ("PREC", "PRECISION") if k in ln.constexprs}
        assert precs == {"tf32" if variant["tf32"] else "ieee"}, (case, precs)
        seen.setdefault(case.stem, set()).add(variant["tf32"])
    assert seen == {"d3diff_head": {False, True}, "moe_mlp": {False, True}}, seen


def test_record_plans_for_the_gpu_even_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    m = lambda *s, dtype=torch.bfloat16: torch.empty(s, dtype=dtype, device="meta")  # noqa: E731
    assert _launch.interpreting() and not _launch.on_gpu(torch.device("cpu"))
    with _launch.record() as launches:
        assert not _launch.interpreting() and _launch.on_gpu(torch.device("meta"))
        assert _launch.sm_count(torch.device("meta")) == _launch.H100.sm_count
        head.head_lse_gather(m(8192, 2304), m(256000, 2304), None, m(8192, dtype=torch.int64), -100)
    (ln,) = launches
    cfg = head._CONFIGS[("fwd", "16bit", "large")]
    assert ln.name == "_fwd_kernel" and ln.constexprs["BLOCK_M"] == cfg.block_m
    assert ln.options == dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    n_rb = 8192 // cfg.block_m
    assert ln.grid[0] == n_rb and ln.grid[1] == -(-2 * 132 // n_rb)  # splits from the target's SM count
    assert _launch.interpreting()  # restored


def test_launch_runs_outside_record():
    calls = []

    class K:
        def __getitem__(self, grid):
            return lambda *a, **kw: calls.append((grid, a, kw))

    _launch.launch(_launch.Launch(K(), (3,), (1, 2), dict(B=4), dict(num_warps=2)))
    assert calls == [((3,), (1, 2), dict(B=4, num_warps=2))]


# ------------------------------------------------------------------------------- the analysis

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   STL [R1], R4 ;
        /*0020*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0030*/                   LDL R5, [R1] ;
        /*0040*/               @P0 BRA 0x20 ;
        /*0050*/                   STL [R1+0x4], R6 ;
        /*0060*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
        /*0070*/              @!P1 BRA 0x10 ;
        /*0080*/                   EXIT ;
        /*0090*/                   BRA 0x90;
"""


def test_analyse_sass_loops_and_tensor_cores():
    r = chk.analyse_sass(SASS)
    assert r["loops"] == 2 and r["hgmma"] == 1 and r["hmma"] == 1
    # the LDL at 0x30 is in the innermost loop [0x20, 0x40]; STL 0x10 / 0x50 only in the outer one
    assert r["local_insts"] == 3 and r["hot_local_insts"] == 1 and r["outer_local_insts"] == 2


TTGIR = "\n".join(
    [
        "%acc_1 = ttng.warp_group_dot %a, %b, %arg20 {inputPrecision = 0 : i32, isAsync = true} : "
        "!ttg.memdesc<128x64xbf16, #s> * !ttg.memdesc<64x128xbf16, #s> -> tensor<128x128xf32, #mma>",
        "%acc_2:3 = ttng.warp_group_dot_wait %acc_1, %a, %b {pendings = 0 : i32} : tensor<128x128xf32, #mma>",
        "%c_1 = ttng.warp_group_dot %x, %y, %cst {inputPrecision = 0 : i32, isAsync = true} : "
        "!ttg.memdesc<64x64xf16, #s> * !ttg.memdesc<64x64xf16, #s> -> tensor<64x64xf32, #mma>",
        "%c_2 = ttng.warp_group_dot_wait %c_1 {pendings = 0 : i32} : tensor<64x64xf32, #mma>",
        "%d = tt.dot %p, %q, %arg7, inputPrecision = tf32 : "
        "tensor<64x32xbf16, #d0> * tensor<32x64xbf16, #d1> -> tensor<64x64xf32, #mma2>",
        "%e = tt.dot %p, %q, %arg8, inputPrecision = ieee : "
        "tensor<64x32xf32, #d0> * tensor<32x64xf32, #d1> -> tensor<64x64xf32, #blocked>",
    ]
)


def test_analyse_ttgir_dots_and_serial_wgmma():
    r = chk.analyse_ttgir(TTGIR)
    assert [(d["op"], d["M"], d["dtype"]) for d in r["dots"]] == [
        ("wgmma", 128, "bf16"),
        ("wgmma", 64, "f16"),
        ("dot", 64, "bf16"),
        ("dot", 64, "f32"),
    ]
    assert r["serial_wgmma"] == 1  # only the loop-carried accumulator waited with pendings = 0


def test_parse_ptxas_log():
    log = (
        "ptxas info    : Function properties for k\n"
        "    64 bytes stack frame, 60 bytes spill stores, 56 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 64 bytes cumulative stack size\n"
    )
    assert chk.parse_ptxas_log(log) == dict(regs=255, stack=64, spill_stores=60, spill_loads=56)


class _C:
    def __init__(self, dtype, variant=()):
        self.dtype, self.variant, self.stem, self.entry, self.shape = dtype, variant, "s", "e", "x"

    @property
    def variant_label(self):
        return ",".join(f"{k}={v}" for k, v in self.variant) or "-"


def _spec(kernel="_k", dtypes=("bf16",), config="BLOCK_M=64 w4 s3", variant=()):
    s = chk.Spec(kernel, "m.stem", {"X": "*bf16"}, {}, {}, {"num_warps": 4}, config, "", "h")
    s.cases = [_C(d, variant) for d in dtypes]
    return s


def _result(**kw):
    r = dict(ok=True, smem=1024, regs=128, spill_stores=0, spill_loads=0, local_insts=0, hot_local_insts=0)
    r.update(outer_local_insts=0, dots=[], hgmma=0, hmma=0, serial_wgmma=0, num_warps=4)
    r.update(kw)
    return r


@pytest.mark.parametrize(
    "dtypes,result,rules",
    [
        (("bf16",), _result(), []),
        (("bf16",), dict(ok=False, error="boom"), ["compile"]),
        (("fp32",), _result(smem=201 * 1024), ["smem"]),
        (("bf16",), _result(spill_stores=4, spill_loads=4, local_insts=2), ["spill"]),
        ((None,), _result(spill_stores=4, spill_loads=4, local_insts=2), ["spill"]),
        (("fp32",), _result(spill_stores=4, spill_loads=4, local_insts=2, outer_local_insts=2), []),
        (("fp32",), _result(spill_stores=4, spill_loads=4, local_insts=2, hot_local_insts=1), ["hot-loop-spill"]),
        (("fp32", "bf16"), _result(spill_stores=4, local_insts=1, outer_local_insts=1), ["spill"]),
        (("bf16",), _result(dots=[dict(op="dot", M=64, N=64, dtype="bf16")], hmma=4), ["wgmma"]),
        (("fp16",), _result(dots=[dict(op="dot", M=16, N=64, dtype="f16")], hmma=4), []),
        (("fp32",), _result(dots=[dict(op="dot", M=128, N=64, dtype="f32")]), []),
        (("bf16",), _result(dots=[dict(op="wgmma", M=64, N=64, dtype="bf16")]), ["wgmma"]),
        (
            ("bf16",),
            _result(dots=[dict(op="wgmma", M=64, N=64, dtype="bf16")], hgmma=2, serial_wgmma=1),
            ["serial-wgmma"],
        ),
        (("bf16",), _result(regs=255, num_warps=8), ["reg-cap"]),
        (("bf16",), _result(regs=255, num_warps=4), []),
        (("fp32",), _result(regs=255, num_warps=8), []),
    ],
)
def test_rules(dtypes, result, rules):
    assert [v.rule for v in chk.violations(_spec(dtypes=dtypes), result)] == rules


# PTX lines as the sampling kernels gave them before they were made bit-exact on the card (tl.exp,
# an fp32 '/', FMA contraction on) and as they give them now (enable_fp_fusion=False, div_rn)
_PTX_BEFORE = "\tex2.approx.f32 \t%r62, %r61;\n\tdiv.full.f32 \t%r65, %r63, %r64;\n\tfma.rn.f32 \t%r1, %r2, %r3, %r4;\n"
_PTX_AFTER = "\tmul.rn.f32 \t%r1, %r2, %r3;\n\tdiv.rn.f32 \t%r5, %r6, %r7;\n\tcvt.rzi.s64.f32 \t%rd1, %r1;\n"


def test_fp_exact_rule():
    """Kernels of the bit-exact stems (sampling, rng) may not contain contractible or approximate
    fp32 instructions: on the card they would round differently from the reference."""
    before = chk.analyse_ptx(_PTX_BEFORE)["inexact_fp"]
    assert before == {"ex2.approx.f32": 1, "div.full.f32": 1, "fma.rn.f32": 1}
    assert chk.analyse_ptx(_PTX_AFTER)["inexact_fp"] == {}
    assert chk.analyse_ptx("\tmul.f32 \t%r1, %r2, %r3;\n")["inexact_fp"] == {"mul.f32": 1}
    for stem, rules in (("sampling", ["fp-exact"]), ("rng", ["fp-exact"]), ("d3diff", [])):
        spec = _spec(dtypes=("fp32",))
        for c in spec.cases:
            c.stem = stem
        assert [v.rule for v in chk.violations(spec, _result(inexact_fp=before))] == rules
        assert chk.violations(spec, _result(inexact_fp={})) == []


def test_known_violations_expected_stale_and_new():
    a, b = _spec("_a"), _spec("_b", dtypes=("fp32",), config="BLOCK_M=128 w8 s3")
    specs = {a.id: a, b.id: b}
    assert a.id != b.id
    spill = _result(spill_stores=8, spill_loads=8, local_insts=2, hot_local_insts=2)
    ka = chk.Known("_a", "spill", "16.3", "x")
    kb = chk.Known("_b", "hot-loop-spill", "16.3", "y", dtype="fp32", config="BLOCK_M=128")
    v = chk.judge(specs, {a.id: spill, b.id: spill}, [ka, kb])
    assert v.ok and len(v.violations) == 2 and not v.unexpected
    # a fixed kernel makes its entry stale: the check fails until the entry is deleted
    v = chk.judge(specs, {a.id: spill, b.id: _result()}, [ka, kb])
    assert not v.ok and v.stale == [kb]
    v = chk.judge(specs, {a.id: spill, b.id: _result()}, [ka])
    assert v.ok
    # a violation without an entry fails
    v = chk.judge(specs, {a.id: spill, b.id: spill}, [ka])
    assert not v.ok and [x.kernel for x in v.unexpected] == ["_b"]
    # an entry matching nothing compiled: stale in a full run, only reported in a subset run
    kc = chk.Known("_c", "spill", "16.3", "z")
    assert chk.judge(specs, {a.id: spill}, [ka, kc], full=True).stale == [kc]
    v = chk.judge(specs, {a.id: spill}, [ka, kc], full=False)
    assert v.ok and v.unexercised == [kc]
    # narrowing filters
    assert not chk.Known("_b", "spill", "", "", dtype="bf16").matches_spec(b)
    assert not chk.Known("_b", "spill", "", "", config="BLOCK_M=64").matches_spec(b)


def test_table_roundtrip_and_covering_subset():
    s1, s2 = _spec("_a", dtypes=("bf16", "fp32")), _spec("_a", dtypes=("fp16",), config="BLOCK_M=128 w8 s3")
    s2.options = {"num_warps": 8}
    s3 = _spec("_a", dtypes=("bf16",))
    s3.signature = {"X": "*fp16"}
    specs = {s.id: s for s in (s1, s2, s3)}
    res = {i: _result() for i in specs}
    rows = chk.table_rows(specs, res)
    back = chk.parse_table(chk.render_table(rows))
    assert set(back) == set(specs) and all(back[r["id"]] == r for r in rows)
    chosen = chk.covering_subset(specs)
    assert set(chosen) == {s1.id, s2.id}  # s3 adds no dtype, config or variant


def test_known_list_is_well_formed():
    for k in KNOWN:
        assert k.rule in chk.RULES and k.item and k.why and k.kernel.startswith("_"), k


# ------------------------------------------------------------------------------- the check


def _cuda_tools_present() -> bool:
    import triton

    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _cuda_tools_present(), reason="the triton wheel ships no ptxas/cuobjdump here")
def test_sm90_compile_check():
    """The CI run: the covering subset compiled for sm_90a, judged against the known violations,
    its rows compared with the committed table (benchmarks/results/triton_sm90_resources.md)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    jobs = os.environ.get("UNIF2ACE_SM90_JOBS", "2")
    p = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_triton_sm90.py"), "-j", jobs],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    print(p.stdout[-20000:], p.stderr[-5000:])
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]


def test_stems_cover_the_triton_package():
    files = {f.stem for f in (ROOT / "unif2ace" / "kernels" / "triton").glob("*.py") if not f.stem.startswith("_")}
    assert set(STEMS) == files
