"""The sm_90a compile check of the Triton kernels, without a GPU (scripts/check_triton_sm90.py).

Pipeline (docs/testing.md, "The sm_90a compile check"):

1. **Plan.** Every case of :mod:`.triton_sm90_cases` calls a launcher of
   ``unif2ace.kernels.triton`` on ``meta`` tensors inside
   :func:`unif2ace.kernels.triton._launch.record`, which collects the launches the launcher plans
   for an H100 instead of running them.
2. **Specialise.** Each launch goes through Triton's own binder for the ``cuda:90`` target (the code
   a real launch runs): argument types, ``tt.divisibility`` of pointers and ints, ints equal to 1
   turned into constexprs, compile options. Identical specialisations are compiled once (a
   :class:`Spec`, merging the cases that reach it).
3. **Compile** for sm_90a (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the wheel's ptxas), in
   worker processes with ``TRITON_INTERPRET`` unset, and **analyse**: registers and spill bytes
   (ptxas log), shared memory (``metadata.shared``), SASS (``cuobjdump -sass``: HGMMA/HMMA,
   STL/LDL inside loops), TTGIR (16-bit ``tt.dot`` s and whether they became wgmma, wgmma waits).
   Results are cached in ``.cache/triton_sm90`` by a key that includes the kernel's source hash.
4. **Judge** with :data:`RULES`; violations listed in :mod:`.triton_sm90_known` are expected, any
   other fails the check, and a known entry that no longer violates fails it too (stale).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

ANALYSIS_VERSION = 3  # bump when the analysis changes (invalidates the result cache)

SMEM_BUDGET = 200 * 1024  # bytes; the H100/H200 opt-in limit per block is 227 KB
REG_CAP = 248  # registers per thread at which ptxas is at its ceiling (255)
REG_FILE = 65536  # registers per SM

RULES: Dict[str, str] = {
    "compile": "the kernel does not compile for sm_90a",
    "smem": f"shared memory above {SMEM_BUDGET // 1024} KB (card opt-in limit 227 KB)",
    "spill": "spills (local-memory traffic) in a kernel that must not spill: bf16/fp16 data, or no float data",
    "hot-loop-spill": "an fp32 kernel spills inside a hot loop (STL/LDL inside an innermost SASS loop)",
    "wgmma": "a bf16/fp16 tl.dot with a tile of >= 64 rows that does not lower to wgmma (HGMMA)",
    "serial-wgmma": "an accumulating wgmma in a loop is waited for in the same iteration (not pipelined)",
    "reg-cap": f">= {REG_CAP} registers per thread and one CTA per SM by registers, in a kernel that must not spill",
    "fp-exact": "a kernel of a bit-exact stem (EXACT_FP_STEMS) has contractible or approximate fp32 instructions in "
    "its PTX (fma, mul/add/sub without .rn, div.full/approx, ex2/lg2/rcp/sqrt .approx)",
}

# Stems whose kernels must compute the reference's fp32 bits on the card (docs/kernels.md §C: the
# sampling ops' exact fp32 definitions): every fp32 operation an IEEE .rn one, none fused.
EXACT_FP_STEMS = ("sampling", "rng")

_INEXACT_PTX = re.compile(
    r"^\s*(fma\.[\w.]*f32|(?:mul|add|sub)\.f32|(?:mul|add|sub)\.ftz\.f32|div\.(?:full|approx)[\w.]*|"
    r"(?:ex2|lg2|rcp|sqrt|rsqrt|sin|cos|tanh)\.approx[\w.]*)\s",
    re.M,
)


def analyse_ptx(ptx: str) -> Dict[str, Any]:
    """The contractible (``mul/add/sub.f32`` without a rounding mode: ptxas may fuse them) and
    approximate fp32 instructions of the PTX, by opcode."""
    found: Dict[str, int] = {}
    for m in _INEXACT_PTX.finditer(ptx):
        found[m.group(1)] = found.get(m.group(1), 0) + 1
    return dict(inexact_fp=found)


# ----------------------------------------------------------------------------------- planning


@dataclass
class Spec:
    """One distinct compilation: a kernel with the exact specialisation a real launch gets."""

    kernel: str
    module: str
    signature: Dict[str, str]
    constexprs: Dict[Tuple[int, ...], Any]
    attrs: Dict[Tuple[int, ...], Any]
    options: Dict[str, Any]
    config: str  # tile constexprs + warps/stages
    consts: str  # the other constexprs (variant switches) and int specialisations
    src_hash: str  # Triton's hash of the kernel's source and its dependencies
    cases: List[Any] = field(default_factory=list)

    @property
    def id(self) -> str:
        """Identity without the source: the same launch keeps its id when the kernel is edited."""
        opts = {k: v for k, v in self.options.items() if k != "extern_libs"}
        blob = json.dumps(
            [self.kernel, self.signature, _jsonable(self.constexprs), _jsonable(self.attrs), opts], default=str
        )
        return hashlib.sha1(blob.encode()).hexdigest()[:10]

    @property
    def cache_key(self) -> str:
        import triton

        blob = json.dumps([ANALYSIS_VERSION, triton.__version__, self.src_hash, self.id], default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    @property
    def dtypes(self) -> List[str]:
        return sorted({c.dtype or "-" for c in self.cases})

    @property
    def strict(self) -> bool:
        """Must not spill at all: some case has bf16/fp16 data, or the kernel has no float data."""
        return any(c.dtype in ("bf16", "fp16", None) for c in self.cases)

    def features(self) -> set:
        """What this spec covers, for the CI subset: kernel x dtype, kernel x config, kernel x variant."""
        out = {("config", self.kernel, self.config)}
        for c in self.cases:
            out.add(("dtype", self.kernel, c.dtype))
            out.add(("entry", self.kernel, c.stem, c.entry))
            for k, v in c.variant:
                out.add(("variant", self.kernel, k, v))
        return out

    def job(self) -> Dict[str, Any]:
        return dict(
            kernel=self.kernel,
            module=self.module,
            signature=self.signature,
            constexprs=self.constexprs,
            attrs=self.attrs,
            options=self.options,
        )


def _jsonable(d: Dict) -> List:
    return sorted([list(k), v] for k, v in d.items()) if d else []


_TILE = re.compile(r"^(BLOCK_\w+)$")


def plan_specs(cases: Sequence[Any], capability: int = 90) -> Tuple[Dict[str, Spec], List[Tuple[Any, str]]]:
    """Record every case's launches and specialise them with Triton's binder for ``cuda:capability``.
    Returns ({spec id: spec}, [(case, error)] for cases whose launcher failed)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from unif2ace.kernels.triton._launch import GpuTarget, record

    backend = make_backend(GPUTarget("cuda", capability, 32))
    target = GpuTarget(f"sm_{capability}", capability, 132)
    binders: Dict[Any, Any] = {}
    specs: Dict[str, Spec] = {}
    failed = []
    for case in cases:
        try:
            with record(target) as launches:
                case.call()
        except Exception as e:  # a launcher that cannot plan these inputs is a failure of the check
            failed.append((case, f"{type(e).__name__}: {e}"))
            continue
        for ln in launches:
            fn = ln.kernel
            if not hasattr(fn, "params"):
                raise RuntimeError("the kernels are interpreter objects: run the check with TRITON_INTERPRET unset")
            if fn not in binders:
                binders[fn] = create_function_from_signature(fn.signature, fn.params, backend)
            kw = dict(ln.constexprs, **ln.options)
            kw.setdefault("debug", False)
            bound, specialization, opts = binders[fn](*ln.args, **kw)
            options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, specialization, opts)
            names = list(signature)
            tiles, other = [], []
            for path, val in constexprs.items():
                name = names[path[0]]
                (tiles if _TILE.match(name) else other).append(f"{name}={_short(val)}")
            tiles.append(f"w{options.num_warps}")
            tiles.append(f"s{options.num_stages}")
            ints = [n for i, n in enumerate(names) if signature[n][0] in "iu" and (i,) in attrs and attrs[(i,)]]
            if ints:
                other.append("div16:" + "/".join(ints))
            spec = Spec(
                kernel=ln.name,
                module=fn.fn.__module__,
                signature=dict(signature),
                constexprs=dict(constexprs),
                attrs=dict(attrs),
                options=dict(options.__dict__),
                config=" ".join(tiles),
                consts=" ".join(other),
                src_hash=fn.cache_key,
            )
            spec = specs.setdefault(spec.id, spec)
            if case not in spec.cases:
                spec.cases.append(case)
    return specs, failed


def _short(v: Any) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    return str(v)


def covering_subset(specs: Dict[str, Spec], must: Iterable[str] = ()) -> List[str]:
    """A small subset of spec ids that covers every feature of the full set (every kernel in every
    dtype, every config and every variant value it has), greedily, plus the ids in ``must``."""
    chosen = list(dict.fromkeys(must))
    covered = set()
    for i in chosen:
        covered |= specs[i].features()
    todo = set().union(*(s.features() for s in specs.values())) - covered if specs else set()
    order = sorted(specs)  # deterministic
    while todo:
        best = max(order, key=lambda i: (len(specs[i].features() & todo), -len(specs[i].cases), i))
        gain = specs[best].features() & todo
        if not gain:
            break
        chosen.append(best)
        todo -= gain
    return chosen


# ---------------------------------------------------------------------------------- compiling


def _bin(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def compile_job(job: Dict[str, Any], dump: Optional[str] = None) -> Dict[str, Any]:
    """Compile one spec for sm_90a and analyse it (runs in a worker process). ``dump``: a directory
    to write the kernel's TTIR, TTGIR, LLIR, PTX, SASS and ptxas log into."""
    os.environ.pop("TRITON_INTERPRET", None)
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget

    t0 = time.time()
    triton.knobs.nvidia.dump_ptxas_log = True
    triton.knobs.compilation.always_compile = True
    fn = getattr(importlib.import_module(job["module"]), job["kernel"])
    src = triton.compiler.ASTSource(fn, job["signature"], job["constexprs"], job["attrs"])
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=job["options"])
    except Exception as e:
        msg = str(e).strip().splitlines()
        return dict(ok=False, error=(type(e).__name__ + ": " + " | ".join(msg[:6]))[:600], compile_s=time.time() - t0)
    with tempfile.TemporaryDirectory() as d:
        cubin = Path(d) / "k.cubin"
        cubin.write_bytes(k.asm["cubin"])
        sass = subprocess.run(
            [_bin("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
    if dump is not None:
        out = Path(dump)
        out.mkdir(parents=True, exist_ok=True)
        for ext in ("ttir", "ttgir", "llir", "ptx"):
            (out / f"{job['kernel']}.{ext}").write_text(k.asm[ext])
        (out / f"{job['kernel']}.sass").write_text(sass)
        (out / f"{job['kernel']}.ptxas.log").write_text(log.getvalue())
    res = dict(ok=True, error="", compile_s=time.time() - t0, smem=int(k.metadata.shared))
    res.update(num_warps=k.metadata.num_warps, num_stages=k.metadata.num_stages)
    res.update(parse_ptxas_log(log.getvalue()))
    res.update(analyse_sass(sass))
    res.update(analyse_ttgir(k.asm["ttgir"]))
    res.update(analyse_ptx(k.asm["ptx"]))
    return res


def parse_ptxas_log(log: str) -> Dict[str, int]:
    def num(pat: str) -> int:
        m = re.search(pat, log)
        return int(m.group(1)) if m else 0

    return dict(
        regs=num(r"Used (\d+) registers"),
        stack=num(r"(\d+) bytes stack frame"),
        spill_stores=num(r"(\d+) bytes spill stores"),
        spill_loads=num(r"(\d+) bytes spill loads"),
    )


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_BRA = re.compile(r"\bBRA(?:\.[\w.]+)?\s+(?:`\(\w+\)\s*)?0x([0-9a-f]+)")


def analyse_sass(sass: str) -> Dict[str, Any]:
    """Tensor-core instructions, and local-memory traffic (STL/LDL: spills) inside loops.

    A loop is the address range [target, branch] of a backward branch (``BRA`` to a lower address).
    The *hot* loops are the innermost ones (ranges that hold no other loop): the K-loops of the
    GEMM tiles, the sweeps over vocabulary tiles. STL/LDL there run once per iteration of the
    kernel's inner work; STL/LDL elsewhere in an outer loop run once per tile (counted apart)."""
    insts: List[Tuple[int, str]] = []
    for m in _SASS_LINE.finditer(sass):
        insts.append((int(m.group(1), 16), m.group(2).strip()))
    loops = []
    for addr, text in insts:
        b = _BRA.search(text)
        if b:
            tgt = int(b.group(1), 16)
            if tgt < addr:
                loops.append((tgt, addr))
    inner = [(lo, hi) for lo, hi in loops if not any((lo, hi) != o and lo <= o[0] and o[1] <= hi for o in loops)]
    local = [a for a, t in insts if re.search(r"\b(STL|LDL)\b", t)]
    in_inner = [a for a in local if any(lo <= a <= hi for lo, hi in inner)]
    in_any = [a for a in local if any(lo <= a <= hi for lo, hi in loops)]

    def count(op: str) -> int:
        return sum(1 for _, t in insts if re.search(rf"\b{op}\b", t))

    return dict(
        hgmma=count("HGMMA"),
        hmma=count("HMMA"),
        ffma=count("FFMA"),
        local_insts=len(local),
        hot_local_insts=len(in_inner),
        outer_local_insts=len(in_any) - len(in_inner),
        loops=len(loops),
    )


_DOT = re.compile(r"=\s*(tt\.dot|ttng\.warp_group_dot)\s+(%[\w#.]+),\s*(%[\w#.]+),\s*(%[\w#.]+)(.*)$")
_OPERAND_TYPE = re.compile(r":\s*(?:tensor|!ttg\.memdesc)<(\d+)x(\d+)x(\w+)")
_RESULT_TYPE = re.compile(r"->\s*tensor<(\d+)x(\d+)x(\w+)")


def analyse_ttgir(ttgir: str) -> Dict[str, Any]:
    """16-bit dots (``tt.dot`` left after the accelerate-matmul pass is an mma v2 / FMA dot;
    ``ttng.warp_group_dot`` is wgmma) and wgmmas that accumulate across a loop but are waited for
    in the same iteration (``warp_group_dot_wait {pendings = 0}`` on a dot whose accumulator is a
    loop-carried block argument)."""
    dots = []
    serial = 0
    lines = ttgir.splitlines()
    for i, line in enumerate(lines):
        m = _DOT.search(line)
        if not m:
            continue
        op, acc, rest = m.group(1), m.group(4), m.group(5)
        ot = _OPERAND_TYPE.search(rest)
        rt = _RESULT_TYPE.search(rest)
        if not (ot and rt):
            continue
        dots.append(
            dict(
                op="wgmma" if op.startswith("ttng") else "dot",
                M=int(rt.group(1)),
                N=int(rt.group(2)),
                dtype=ot.group(3),
            )
        )
        if op.startswith("ttng") and re.match(r"%arg\d+$", acc):
            res = line.split("=", 1)[0].strip()
            for nxt in lines[i + 1 : i + 40]:
                if "warp_group_dot_wait" in nxt and re.search(rf"{re.escape(res)}\b", nxt):
                    if re.search(r"pendings = 0\b", nxt):
                        serial += 1
                    break
    return dict(dots=dots, serial_wgmma=serial)


def run_jobs(specs: Sequence[Spec], jobs: int, cache_dir: Optional[Path], log=print) -> Dict[str, Dict[str, Any]]:
    """Results by spec id: from the cache where present, else compiled in ``jobs`` processes."""
    results: Dict[str, Dict[str, Any]] = {}
    todo = []
    for s in specs:
        f = cache_dir / f"{s.cache_key}.json" if cache_dir else None
        if f is not None and f.exists():
            results[s.id] = json.loads(f.read_text())
            results[s.id]["cached"] = True
        else:
            todo.append(s)
    if not todo:
        return results
    log(f"compiling {len(todo)} kernels for sm_90a in {jobs} processes ({len(results)} cached)")
    env_interp = os.environ.pop("TRITON_INTERPRET", None)  # the spawned workers inherit the environment
    tmp_cache = tempfile.mkdtemp(prefix="triton_sm90_")
    os.environ["TRITON_CACHE_DIR"] = tmp_cache  # never the user's ~/.triton cache
    try:
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=ctx) as pool:
            futs = {pool.submit(compile_job, s.job()): s for s in todo}
            for n, fut in enumerate(cf.as_completed(futs), 1):
                s = futs[fut]
                try:
                    r = fut.result()
                except Exception as e:  # a crashed worker is a compile failure of that spec
                    r = dict(ok=False, error=f"worker failed: {type(e).__name__}: {e}"[:600], compile_s=0.0)
                results[s.id] = r
                if cache_dir is not None:
                    cache_dir.mkdir(parents=True, exist_ok=True)
                    (cache_dir / f"{s.cache_key}.json").write_text(json.dumps(r))
                if n % 20 == 0 or n == len(todo):
                    log(f"  {n}/{len(todo)}")
    finally:
        if env_interp is not None:
            os.environ["TRITON_INTERPRET"] = env_interp
        os.environ.pop("TRITON_CACHE_DIR", None)
        import shutil

        shutil.rmtree(tmp_cache, ignore_errors=True)
    return results


# ------------------------------------------------------------------------------------- judging


@dataclass(frozen=True)
class Violation:
    spec_id: str
    kernel: str
    rule: str
    detail: str


def violations(spec: Spec, r: Dict[str, Any]) -> List[Violation]:
    """The rules :data:`RULES` applied to one compiled spec."""
    out = []

    def v(rule, detail):
        out.append(Violation(spec.id, spec.kernel, rule, detail))

    if not r.get("ok"):
        v("compile", r.get("error", "?"))
        return out
    if r["smem"] > SMEM_BUDGET:
        v("smem", f"{r['smem'] / 1024:.1f} KB")
    spill = r["spill_stores"] + r["spill_loads"]
    if spec.strict and (spill or r["local_insts"]):
        v("spill", f"{r['spill_stores']} B stores / {r['spill_loads']} B loads, {r['regs']} regs")
    elif not spec.strict and r["hot_local_insts"]:
        v("hot-loop-spill", f"{r['hot_local_insts']} STL/LDL in innermost loops, {r['spill_stores']} B spill stores")
    bad16 = [d for d in r["dots"] if d["dtype"] in ("bf16", "f16") and d["M"] >= 64 and d["op"] != "wgmma"]
    if bad16:
        v("wgmma", ", ".join(f"{d['M']}x{d['N']} {d['dtype']}" for d in bad16))
    elif any(d["op"] == "wgmma" for d in r["dots"]) and not r["hgmma"]:
        v("wgmma", "wgmma in TTGIR but no HGMMA in SASS")
    if r["serial_wgmma"]:
        v("serial-wgmma", f"{r['serial_wgmma']} accumulating wgmma(s) waited for in their loop")
    threads = 32 * r["num_warps"]
    if spec.strict and r["regs"] >= REG_CAP and r["regs"] * threads > REG_FILE // 2:
        v("reg-cap", f"{r['regs']} regs x {threads} threads")
    if r.get("inexact_fp") and any(c.stem in EXACT_FP_STEMS for c in spec.cases):
        v("fp-exact", ", ".join(f"{op} x{n}" for op, n in sorted(r["inexact_fp"].items())))
    return out


@dataclass(frozen=True)
class Known:
    """An expected violation: ``rule`` on the specs of ``kernel`` that match the optional filters
    (``dtype`` among the spec's case dtypes; ``config`` / ``consts`` / ``variant`` substrings of
    its config, its other constexprs, its cases' variant labels). ``item``: where the fix is
    tracked; ``why``: what was measured."""

    kernel: str
    rule: str
    item: str
    why: str
    dtype: Optional[str] = None
    config: Optional[str] = None
    consts: Optional[str] = None
    variant: Optional[str] = None

    def matches_spec(self, spec: Spec) -> bool:
        if spec.kernel != self.kernel:
            return False
        if self.dtype is not None and self.dtype not in spec.dtypes:
            return False
        if self.config is not None and self.config not in spec.config:
            return False
        if self.consts is not None and self.consts not in spec.consts:
            return False
        if self.variant is not None and not any(self.variant in c.variant_label for c in spec.cases):
            return False
        return True

    def label(self) -> str:
        f = [x for x in (self.dtype, self.config, self.consts, self.variant) if x]
        where = f" [{' '.join(f)}]" if f else ""
        return f"{self.kernel}{where}: {self.rule} ({self.item})"


def witnesses(specs: Dict[str, Spec], known: Sequence[Known], committed: Dict[str, Dict[str, str]]) -> List[str]:
    """The compilations CI compiles for the known entries: per entry, one compilation per (config,
    dtype) among those the committed table marks as breaking its rule -- or, with none marked, all
    it matches -- so the fix of any config is noticed (as a stale entry) without the whole matrix."""
    out: List[str] = []
    for k in known:
        ids = sorted(i for i, s in specs.items() if k.matches_spec(s))
        marked = [i for i in ids if k.rule in committed.get(i, {}).get("status", "").split(", ")]
        if not marked:
            out += ids
            continue
        seen = set()
        for i in marked:
            key = (specs[i].config, tuple(specs[i].dtypes))
            if key not in seen:
                seen.add(key)
                out.append(i)
    return list(dict.fromkeys(out))


@dataclass
class Verdict:
    violations: List[Violation]  # all found
    unexpected: List[Violation]  # not covered by a known entry
    stale: List[Known]  # known entries that match specs but none of them violates any more
    unexercised: List[Known]  # known entries that match no compiled spec

    @property
    def ok(self) -> bool:
        return not (self.unexpected or self.stale)


def judge(
    specs: Dict[str, Spec], results: Dict[str, Dict[str, Any]], known: Sequence[Known], full: bool = True
) -> Verdict:
    found = []
    for i, r in results.items():
        found.extend(violations(specs[i], r))
    unexpected = [v for v in found if not any(k.rule == v.rule and k.matches_spec(specs[v.spec_id]) for k in known)]
    stale, unexercised = [], []
    for k in known:
        ids = [i for i in results if k.matches_spec(specs[i])]
        if not ids:
            unexercised.append(k)
        elif not any(v.rule == k.rule and v.spec_id in ids for v in found):
            stale.append(k)
    if full:  # with the whole matrix compiled, an entry that matches nothing is stale as well
        stale.extend(unexercised)
    return Verdict(found, unexpected, stale, unexercised)


# ------------------------------------------------------------------------------------- report


def dot_label(r: Dict[str, Any]) -> str:
    if not r.get("ok"):
        return "-"
    kinds = []
    if r["hgmma"]:
        kinds.append(f"HGMMA x{r['hgmma']}")
    if r["hmma"]:
        kinds.append(f"HMMA x{r['hmma']}")
    if not kinds and r["dots"]:
        kinds.append("FFMA (no tensor cores)")
    return ", ".join(kinds) or "-"


def table_rows(specs: Dict[str, Spec], results: Dict[str, Dict[str, Any]]) -> List[Dict[str, str]]:
    rows = []
    for i in sorted(results, key=lambda i: (specs[i].module, specs[i].kernel, specs[i].config, specs[i].consts, i)):
        s, r = specs[i], results[i]
        vs = violations(s, r)
        stem = s.module.rsplit(".", 1)[-1]
        variants = sorted({f"{c.entry}:{c.variant_label}" for c in s.cases})
        shapes = sorted({c.shape for c in s.cases})
        row = dict(
            id=i,
            kernel=f"{stem}.{s.kernel}",
            config=s.config,
            consts=s.consts or "-",
            dtype="/".join(s.dtypes),
            variants=_cap(variants, 3),
            shapes=_cap(shapes, 2),
            regs=str(r.get("regs", "-")),
            spill=_spill_label(r) if r.get("ok") else "-",
            smem=(f"{r['smem'] / 1024:.1f} KB" if r["smem"] >= 1024 else f"{r['smem']} B") if r.get("ok") else "-",
            dot=dot_label(r),
            status=", ".join(sorted({v.rule for v in vs})) or "ok",
        )
        rows.append(row)
    return rows


def _spill_label(r: Dict[str, Any]) -> str:
    out = f"{r['spill_stores']}/{r['spill_loads']}"
    where = []
    if r["hot_local_insts"]:
        where.append(f"{r['hot_local_insts']} hot")
    if r["outer_local_insts"]:
        where.append(f"{r['outer_local_insts']} outer")
    return out + (f" ({', '.join(where)})" if where else "")


def _cap(items: List[str], n: int) -> str:
    return "; ".join(items[:n]) + (f"; +{len(items) - n} more" if len(items) > n else "")


COLUMNS = [
    ("id", "id"),
    ("kernel", "kernel"),
    ("config", "config (tiles, warps, stages)"),
    ("consts", "other constexprs / div-16 ints"),
    ("dtype", "dtype"),
    ("variants", "entry:variant"),
    ("shapes", "shapes"),
    ("regs", "regs"),
    ("spill", "spill B st/ld"),
    ("smem", "smem"),
    ("dot", "dot instr"),
    ("status", "violations"),
]


def render_table(rows: List[Dict[str, str]]) -> str:
    head = "| " + " | ".join(t for _, t in COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    return head + "".join("| " + " | ".join(r[k].replace("|", "/") for k, _ in COLUMNS) + " |\n" for r in rows)


def parse_table(text: str) -> Dict[str, Dict[str, str]]:
    """Rows of a rendered table by id (for the committed-table comparison)."""
    rows = {}
    for line in text.splitlines():
        if not line.startswith("| ") or line.startswith("| id "):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) == len(COLUMNS):
            rows[cells[0]] = {k: c for (k, _), c in zip(COLUMNS, cells)}
    return rows


MEASURED = ("regs", "spill", "smem", "dot", "status")
"""The columns the CI run compares against the committed table."""


def main_summary(verdict: Verdict, specs: Dict[str, Spec], known: Sequence[Known]) -> str:
    lines = []
    by_rule: Dict[str, List[Violation]] = {}
    for v in verdict.violations:
        by_rule.setdefault(v.rule, []).append(v)
    for rule, vs in sorted(by_rule.items()):
        lines.append(f"{rule}: {len(vs)} compile(s) -- {RULES[rule]}")
        for v in vs[:200]:
            s = specs[v.spec_id]
            tag = "known" if v not in verdict.unexpected else "NEW"
            lines.append(f"  [{tag}] {v.spec_id} {s.kernel} {s.config} {'/'.join(s.dtypes)} {s.consts}: {v.detail}")
    for k in verdict.stale:
        lines.append(f"STALE known violation (no longer violates or matches nothing): {k.label()}")
    return "\n".join(lines)


def write_report(
    path: Path,
    rows: List[Dict[str, str]],
    verdict: Verdict,
    known: Sequence[Known],
    n_cases: int,
    mode: str,
) -> None:
    import torch
    import triton

    by_rule: Dict[str, int] = {}
    for v in verdict.violations:
        by_rule[v.rule] = by_rule.get(v.rule, 0) + 1
    text = [
        "# Triton kernels on sm_90a: resources (compiled without a GPU)",
        "",
        f"Generated by `python scripts/check_triton_sm90.py {mode}` -- do not edit by hand. "
        f"triton {triton.__version__} (ptxas from the wheel), torch {torch.__version__}; target `cuda:90` "
        f"(sm_90a, H100/H200); {n_cases} launcher calls -> {len(rows)} distinct compilations.",
        "",
        'Rules (docs/testing.md, "The sm_90a compile check"):',
        "",
    ]
    text += [f"- `{k}`: {v}" for k, v in RULES.items()]
    text += ["", "Violations found: " + (", ".join(f"`{k}` x{n}" for k, n in sorted(by_rule.items())) or "none") + "."]
    text += ["", "Known violations (unif2ace/testing/triton_sm90_known.py), to be burnt down:", ""]
    text += [f"- `{k.label()}` -- {k.why}" for k in known] or ["- none"]
    text += [
        "",
        "Columns: `spill B st/ld` = ptxas spill-store / spill-load bytes per thread (and STL/LDL instructions inside "
        "SASS loops); `smem` = the shared memory Triton launches with; `dot instr` = tensor-core instructions "
        "in the SASS. `id` identifies the specialisation (kernel, argument types, constexprs, divisibility, options).",
        "",
        render_table(rows),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text))


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]
