#!/usr/bin/env python
"""Plots of benchmark records: one PNG per op.

    python benchmarks/plot.py RESULTS.json [MORE.json ...] --out DIR
    python benchmarks/run.py ... --plot DIR          (the same, straight after a run)

For every case of the op (one row of panels per case and dtype): left, the median time of every
implementation -- our backends, the reference, ``torch.compile`` of it, baselines and peers --
forward and forward+backward side by side on a log axis, the 20th-80th percentile as an error
bar and the machine limit measured in the same run as a dashed line; right, each row's fraction
of that limit (100 % = the machine's own ``torch.mm`` rate at the op's GEMM shapes, or its copy
bandwidth). Skipped and failed rows are listed by name with their status. Needs matplotlib
(an optional dependency: ``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Dict, List, Sequence

COLORS = {
    "reference": "#7f7f7f",
    "compile": "#bcbcbc",
    "ours": "#1f77b4",
    "baseline": "#9467bd",
    "peer": "#ff7f0e",
    "limit": "#000000",
}
MODES = ("fwd", "fwd+bwd")


def _pct(x: float) -> str:
    return f"{x:.2g}%" if x < 10 else f"{x:.0f}%"


def _filename(op: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", op) + ".png"


def _group(records: Sequence[dict]) -> Dict[str, Dict[tuple, List[dict]]]:
    """{op: {(case, dtype): [records]}} in first-seen order (limit rows included)."""
    out: Dict[str, Dict[tuple, List[dict]]] = {}
    for r in records:
        if not r.get("op") or not r.get("backend"):
            continue
        out.setdefault(r["op"], {}).setdefault((r.get("case"), r.get("dtype")), []).append(r)
    return out


def plot_op(op: str, cases: Dict[tuple, List[dict]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    heights = []
    for recs in cases.values():
        heights.append(max(2, len({r["backend"] for r in recs if r.get("kind") != "limit"})))
    fig, axes = plt.subplots(
        len(cases),
        2,
        figsize=(12, 1.2 + sum(0.42 * h + 1.1 for h in heights)),
        gridspec_kw={"width_ratios": [3, 2], "height_ratios": heights},
        squeeze=False,
    )
    first = next(iter(cases.values()))[0]
    threads = f", {first['threads']} threads" if first.get("threads") else ""
    flush = "" if first.get("l2_flush") is None else (", L2 flushed" if first["l2_flush"] else ", L2 not flushed")
    fig.suptitle(
        f"{op} -- {first.get('device_name')}{threads}{flush}\n"
        f"torch {first.get('torch')}, {first.get('date')}{' (quick sizes)' if first.get('quick') else ''}",
        fontsize=10,
    )
    for (case, dtype), recs, (ax_t, ax_l) in zip(cases.keys(), cases.values(), axes):
        rows: Dict[str, Dict[str, dict]] = {}
        limits: Dict[str, dict] = {}
        for r in recs:
            if r.get("kind") == "limit":
                limits[r["mode"]] = r
            else:
                rows.setdefault(r["backend"], {})[r["mode"]] = r
        labels = list(rows)
        modes = [m for m in MODES if any(m in v for v in rows.values())] or ["fwd"]
        bar_h = 0.8 / len(modes)
        names = []
        for i, label in enumerate(labels):
            by_mode = rows[label]
            any_r = next(iter(by_mode.values()))
            kind = any_r.get("kind") or "ours"
            status = [r["status"] for r in by_mode.values() if r["status"] != "ok"]
            names.append(label + (f"  [{status[0]}]" if status and len(status) == len(by_mode) else ""))
            for j, mode in enumerate(modes):
                r = by_mode.get(mode)
                if r is None or r["status"] != "ok" or not r.get("median_ms"):
                    continue
                y = i + (j - (len(modes) - 1) / 2) * bar_h
                lo = max(0.0, r["median_ms"] - (r.get("p20_ms") or r["median_ms"]))
                hi = max(0.0, (r.get("p80_ms") or r["median_ms"]) - r["median_ms"])
                style = dict(color=COLORS.get(kind, "#1f77b4"), alpha=1.0 if mode == "fwd" else 0.55)
                if mode != "fwd":
                    style["hatch"] = "//"
                ax_t.barh(y, r["median_ms"], height=bar_h, xerr=[[lo], [hi]], ecolor="#333333", **style)
                if r.get("pct_limit") is not None:
                    ax_l.barh(y, r["pct_limit"], height=bar_h, **style)
                    ax_l.text(r["pct_limit"], y, " " + _pct(r["pct_limit"]), va="center", fontsize=7)
        for mode, r in limits.items():
            ls = "--" if mode == "fwd" else ":"
            ax_t.axvline(r["median_ms"], color="k", ls=ls, lw=1)
            ax_t.text(r["median_ms"], -0.45, f"limit {mode}", fontsize=6.5, va="top", ha="center", rotation=90,
                      bbox=dict(facecolor="white", alpha=0.8, pad=0.6, lw=0))  # fmt: skip
        for ax in (ax_t, ax_l):
            ax.set_yticks(range(len(labels)))
            ax.set_ylim(len(labels) - 0.5, -0.5)
            ax.grid(axis="x", alpha=0.3)
        ax_t.set_yticklabels(names, fontsize=8)
        ax_l.set_yticklabels([])
        ax_t.set_xscale("log")
        ax_t.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax_t.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax_t.xaxis.set_minor_formatter(NullFormatter())
        ax_t.set_xlabel("median ms (log; bars: p20-p80)  solid: fwd, hatched: fwd+bwd", fontsize=8)
        descs = list(dict.fromkeys(r.get("limit") for r in limits.values() if r.get("limit")))
        title = f"{case}  {dtype}" + "".join(f"\nlimit: {d}" for d in descs)
        ax_t.set_title(title, fontsize=8.5, loc="left")
        ax_l.axvline(100, color="k", lw=1)
        ax_l.set_xlabel("% of the machine limit (same run)", fontsize=8)
        if not limits:
            ax_l.text(0.5, 0.5, "no limit for this case", transform=ax_l.transAxes, ha="center", fontsize=8)
        ax_t.tick_params(axis="x", labelsize=8)
        ax_l.tick_params(axis="x", labelsize=8)
    kinds = sorted({r.get("kind") for recs in cases.values() for r in recs if r.get("kind") in COLORS},
                   key=list(COLORS).index)  # fmt: skip
    fig.legend(handles=[Patch(color=COLORS[k], label=k) for k in kinds], loc="upper right", fontsize=8, ncol=3)
    fig.tight_layout(rect=(0, 0, 1, 0.97 - 0.25 / max(1, sum(heights))))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_records(records: Sequence[dict], outdir) -> List[Path]:
    """Write ``<op>.png`` into ``outdir`` for every op in ``records``; return the paths."""
    import matplotlib  # noqa: F401 - fail early (ImportError) when matplotlib is missing

    outdir = Path(outdir)
    return [plot_op(op, cases, outdir / _filename(op)) for op, cases in _group(records).items()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/plot.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("json", nargs="+", help="records written by benchmarks/run.py --json")
    p.add_argument("--out", required=True, metavar="DIR")
    a = p.parse_args(argv)
    records = []
    for path in a.json:
        records.extend(json.loads(Path(path).read_text()))
    try:
        paths = plot_records(records, a.out)
    except ImportError as e:
        print(f"error: matplotlib is needed ({e}); pip install matplotlib", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    ROOT = Path(__file__).resolve().parent.parent
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    sys.exit(main())
