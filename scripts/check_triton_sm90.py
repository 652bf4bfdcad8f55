#!/usr/bin/env python
"""Compile every Triton kernel for sm_90a (H100/H200) on a machine without a GPU and check its
resources: registers, spills, shared memory, tensor-core instructions.

    python scripts/check_triton_sm90.py              # CI: a covering subset (every kernel x dtype,
                                                      # x planner config, x variant value) + known cases
    python scripts/check_triton_sm90.py --full --write   # the whole matrix; rewrite the committed table

What is compiled comes from the launchers themselves (unif2ace/kernels/triton/_launch.py: each
launcher is called on meta tensors and its planned launches are recorded), the cases from
unif2ace/testing/triton_sm90_cases.py, the rules and the analysis from
unif2ace/testing/triton_sm90.py, the expected violations from unif2ace/testing/triton_sm90_known.py.
Exit status 1 on a new violation, a stale known violation, a launcher that fails to plan, or (CI
mode) a compiled row that differs from the committed table. Results are cached in
.cache/triton_sm90/ by kernel source hash (--no-cache for a cold run).
See docs/testing.md, "The sm_90a compile check".
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: real @triton.jit functions

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TABLE = ROOT / "benchmarks" / "results" / "triton_sm90_resources.md"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="compile the whole matrix (default: the covering subset)")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    ap.add_argument("--no-cache", action="store_true", help="ignore and do not write .cache/triton_sm90")
    ap.add_argument("--write", action="store_true", help=f"write the resource table to {TABLE.relative_to(ROOT)}")
    ap.add_argument("--table", type=Path, default=TABLE, help="the table to write / compare with")
    ap.add_argument("--no-compare", action="store_true", help="do not compare the compiled rows with the table")
    ap.add_argument("--stem", action="append", help="only these stems (repeatable)")
    ap.add_argument("--list", action="store_true", help="list the selected compilations and exit")
    ap.add_argument(
        "--dump",
        nargs=2,
        metavar=("ID", "DIR"),
        help="compile one compilation (an id of the table) and write its TTIR/TTGIR/LLIR/PTX/SASS and ptxas log to DIR",
    )
    args = ap.parse_args(argv)

    from unif2ace.testing import triton_sm90 as chk
    from unif2ace.testing.triton_sm90_cases import STEMS, all_cases
    from unif2ace.testing.triton_sm90_known import KNOWN

    if args.write and (not args.full or args.stem) and args.table == TABLE:
        ap.error("--write rewrites the committed table: it needs --full and all stems (or another --table)")
    if args.stem and set(args.stem) - set(STEMS):
        ap.error(f"unknown stem(s) {sorted(set(args.stem) - set(STEMS))}; stems: {sorted(STEMS)}")
    t0 = time.time()
    cases = all_cases(args.stem)
    specs, failed = chk.plan_specs(cases)
    known = [k for k in KNOWN if any(k.matches_spec(s) for s in specs.values())] if args.stem else list(KNOWN)
    if args.full:
        chosen = sorted(specs)
    else:
        committed = chk.parse_table(args.table.read_text()) if args.table.exists() else {}
        must = chk.witnesses(specs, known, committed)
        chosen = chk.covering_subset(specs, must)
    mode = "--full" if args.full else "(CI subset)"
    print(
        f"sm_90a compile check {mode}: {len(cases)} launcher calls -> {len(specs)} distinct compilations, "
        f"{len(chosen)} selected"
    )
    for case, err in failed:
        print(f"PLAN FAILED {case.stem}.{case.entry} {case.dtype} {case.variant_label} {case.shape}: {err}")
    if args.list:
        for i in chosen:
            s = specs[i]
            print(f"{i} {s.kernel:24s} {s.config:40s} {'/'.join(s.dtypes):15s} {s.consts}")
        return 0
    if args.dump:
        spec_id, out = args.dump
        if spec_id not in specs:
            ap.error(f"no compilation with id {spec_id} (see --list / --full --list)")
        r = chk.compile_job(specs[spec_id].job(), dump=out)
        print({k: v for k, v in r.items() if k != "dots"}, f"\nwritten to {out}")
        return 0 if r["ok"] else 1
    cache = None if args.no_cache else ROOT / ".cache" / "triton_sm90"
    results = chk.run_jobs([specs[i] for i in chosen], args.jobs, cache)
    sub = {i: specs[i] for i in chosen}
    verdict = chk.judge(sub, results, known, full=args.full)
    rows = chk.table_rows(specs, results)
    print(chk.main_summary(verdict, specs, known))
    ok = verdict.ok and not failed
    if args.write:
        how = "--full --write" if args.full and not args.stem else "(partial: " + " ".join(sys.argv[1:]) + ")"
        chk.write_report(args.table, rows, verdict, known, len(cases), how)
        print(f"wrote {args.table}")
    elif not args.no_compare and args.table.exists():
        committed = chk.parse_table(args.table.read_text())
        diffs = []
        for r in rows:
            c = committed.get(r["id"])
            if c is None:
                diffs.append(f"{r['id']} {r['kernel']} {r['config']}: not in the table")
            elif any(c[k] != r[k] for k in chk.MEASURED):
                got = ", ".join(f"{k} {c[k]!r} -> {r[k]!r}" for k in chk.MEASURED if c[k] != r[k])
                diffs.append(f"{r['id']} {r['kernel']} {r['config']}: {got}")
        if diffs:
            ok = False
            print(f"the committed table {args.table.relative_to(ROOT)} is stale ({len(diffs)} row(s)):")
            print("\n".join("  " + d for d in diffs[:50]))
            print("  regenerate it: python scripts/check_triton_sm90.py --full --write")
    n_cached = sum(1 for r in results.values() if r.get("cached"))
    print(
        f"{'OK' if ok else 'FAILED'}: {len(results)} compilations ({n_cached} cached), {len(verdict.violations)} "
        f"violation(s), {len(verdict.violations) - len(verdict.unexpected)} known, {len(verdict.unexpected)} new, "
        f"{len(verdict.stale)} stale known; {time.time() - t0:.0f} s"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
