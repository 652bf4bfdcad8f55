#!/usr/bin/env bash
# One-shot check on a bare H100/H200 machine (Python 3.12, CUDA torch, triton, nvcc, ninja, pybind11,
# pytest, pytest-xdist; no package index, no network):
#
#   bash scripts/gpu_check.sh [--full] [--skip-build] [--dry-run] [--peers WHEELDIR] [OUTDIR]
#
# OUTDIR defaults to $OUT when set, else gpu_results/<UTC date>. Steps, in this order (the GPU-only
# work first, so that a tight time limit cuts the least useful step):
#   1 env        nvidia-smi, python/torch/triton/nvcc versions                  -> env.log
#   2 build      pip install --no-build-isolation --no-deps -e . (CUDA_HOME, sm_90, 16 jobs),
#                then python -m unif2ace info                                   -> build.log
#   2b peers     pip install --no-deps --no-index WHEELDIR/*.whl: the benchmark peers of
#                requirements-peers.txt (Cut Cross-Entropy, Liger-Kernel), from --peers WHEELDIR
#                or ./peer_wheels when it exists (the machine has no package index: fetch them
#                elsewhere with `pip download --no-deps -d peer_wheels -r requirements-peers.txt`
#                and carry the folder); without wheels the peer rows are skipped -> build.log
#   3 tests-gpu  pytest -m gpu -n 4 (real GPU, TRITON_INTERPRET unset)          -> tests_gpu.log
#   4 bench      benchmarks/run.py --device cuda --quick (our backends, peers, limits; L2 flushed
#                between timed calls)                                           -> bench.log, bench_cuda.json
#   5 tests-cpu  the whole suite with the GPU hidden and TRITON_INTERPRET=1, i.e. the CPU paths
#                on this machine's Python (gpu tests skip)                      -> tests_all.log
#   6 bench-full (--full only) benchmarks/run.py --device cuda (full sizes)     -> bench.log, bench_cuda_full.json
#   summary.md   card, date, versions, per-step status and wall time, pass/fail counts, failing
#                tests, the benchmark table
# A failing step is recorded and the script goes on. Each step runs under `timeout`, capped by an
# overall budget (GPU_CHECK_BUDGET_S, default 450 s; 570 s with --full) so the script ends in time.
# OUTDIR holds at most 8 files (junit XML stays in a scratch folder; its content goes in summary.md).
# PYTHON=... picks the interpreter (default python3). Exit status: 0 if every step passed, else 1.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

FULL=0 DRY=0 SKIP_BUILD=0 OUTDIR="" PEERS=""
want_peers=0
for a in "$@"; do
  if (( want_peers )); then PEERS=$a; want_peers=0; continue; fi
  case "$a" in
    --peers) want_peers=1 ;;
    --peers=*) PEERS=${a#--peers=} ;;
    --full) FULL=1 ;;
    --dry-run) DRY=1 ;;
    --skip-build) SKIP_BUILD=1 ;;
    -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $a" >&2; exit 2 ;;
    *) OUTDIR=$a ;;
  esac
done
(( want_peers )) && { echo "gpu_check.sh: --peers needs a folder" >&2; exit 2; }
if [[ -z $PEERS && -d peer_wheels ]]; then PEERS=peer_wheels; fi
if [[ -n $PEERS && ! -d $PEERS ]]; then echo "gpu_check.sh: --peers $PEERS: no such folder" >&2; exit 2; fi
[[ -n $PEERS ]] && PEERS=$(cd "$PEERS" && pwd)
OUTDIR=${OUTDIR:-${OUT:-gpu_results/$(date -u +%Y%m%d-%H%M%S)}}
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd) || { echo "cannot create $OUTDIR" >&2; exit 2; }
PY=${PYTHON:-python3}
if (( FULL )); then BUDGET=${GPU_CHECK_BUDGET_S:-570}; else BUDGET=${GPU_CHECK_BUDGET_S:-450}; fi
T0=$(date +%s)
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
STEPS=$SCRATCH/steps.tsv
: > "$STEPS"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$ROOT/.cache/inductor}
unset TRITON_INTERPRET

log() { echo "[gpu_check $(( $(date +%s) - T0 ))s] $*"; }

# step NAME LOGFILE CAP_SECONDS COMMAND...   (runs COMMAND under timeout, appends to OUTDIR/LOGFILE)
step() {
  local name=$1 logf=$OUTDIR/$2 cap=$3
  shift 3
  local left=$(( BUDGET - ($(date +%s) - T0) ))
  if (( left < 20 )); then
    echo "== $name: skipped, the ${BUDGET}s budget is spent" >> "$logf"
    printf '%s\tskipped (budget spent)\t0\t%s\t\n' "$name" "$(basename "$logf")" >> "$STEPS"
    log "$name: skipped (budget spent)"
    return 0
  fi
  (( cap > left )) && cap=$left
  echo "== $name: $(date -u +%FT%TZ), limit ${cap}s: $*" >> "$logf"
  log "$name (limit ${cap}s) ..."
  local t1 rc status
  t1=$(date +%s)
  if (( DRY )); then
    rc=0
  else
    timeout -k 10 "$cap" "$@" >> "$logf" 2>&1
    rc=$?
  fi
  local dt=$(( $(date +%s) - t1 ))
  case $rc in
    0) status=ok ;;
    124|137) status="TIMEOUT (${cap}s)" ;;
    *) status="FAIL (exit $rc)" ;;
  esac
  (( DRY )) && status=dry-run
  [[ $name == tests-* && $rc == 5 ]] && status="ok (no tests selected)"
  echo "== $name: $status in ${dt}s" >> "$logf"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$dt" "$(basename "$logf")" "$rc" >> "$STEPS"
  log "$name: $status in ${dt}s"
  return 0
}

left_s() { echo $(( BUDGET - ($(date +%s) - T0) )); }

# ---- 1 environment
ENV_SH=$SCRATCH/env.sh
cat > "$ENV_SH" <<EOF
rc=0
echo "date: \$(date -u +%FT%TZ)   host: \$(hostname)   cores: \$(nproc)"
nvidia-smi || rc=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
"$PY" - <<'PYEOF' || rc=1
import platform, sys
print("python", platform.python_version(), sys.executable)
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton import failed:", e)
for m in ("numpy", "pytest", "xdist", "ninja", "pybind11", "setuptools"):
    try:
        mod = __import__(m); print(m, getattr(mod, "__version__", "?"))
    except Exception as e:
        print(m, "MISSING:", e)
PYEOF
(command -v nvcc >/dev/null && nvcc --version) || ("\${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version) || { echo "nvcc not found"; rc=1; }
exit \$rc
EOF
step env env.log 60 bash "$ENV_SH"

# ---- 2 build
BUILD_SH=$SCRATCH/build.sh
cat > "$BUILD_SH" <<EOF
export CUDA_HOME=\${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
PIPLOG=$SCRATCH/pip.log
"$PY" -m pip install --no-build-isolation --no-deps --disable-pip-version-check -e . 2>&1 | tee \$PIPLOG
rc=\${PIPESTATUS[0]}
if [ \$rc -ne 0 ] && grep -q externally-managed \$PIPLOG; then
  echo "== pip refused (externally managed environment): retrying with --break-system-packages"
  "$PY" -m pip install --no-build-isolation --no-deps --disable-pip-version-check --break-system-packages -e . 2>&1 | tee \$PIPLOG
  rc=\${PIPESTATUS[0]}
fi
if [ \$rc -ne 0 ] && ! grep -qE "ninja: build stopped|error: command .* failed" \$PIPLOG; then
  echo "== pip install failed before compiling: building in place instead (setup.py build_ext --inplace)"
  "$PY" setup.py build_ext --inplace -j 16 && rc=0
fi
echo "== python -m unif2ace info"
"$PY" -m unif2ace info || rc=1
exit \$rc
EOF
if (( SKIP_BUILD )); then
  echo "== build: skipped (--skip-build)" >> "$OUTDIR/build.log"
  printf 'build\tskipped (--skip-build)\t0\tbuild.log\t\n' >> "$STEPS"
  step info build.log 60 "$PY" -m unif2ace info
else
  step build build.log 300 bash "$BUILD_SH"
fi

# ---- 2b benchmark peers from local wheels (no index on the GPU machines)
if [[ -n $PEERS ]]; then
  PEERS_SH=$SCRATCH/peers.sh
  cat > "$PEERS_SH" <<EOF
shopt -s nullglob
whl=("$PEERS"/*.whl)
(( \${#whl[@]} )) || { echo "no wheels in $PEERS"; exit 1; }
"$PY" -m pip install --no-deps --no-index --disable-pip-version-check "\${whl[@]}" \\
  || "$PY" -m pip install --no-deps --no-index --disable-pip-version-check --break-system-packages "\${whl[@]}"
"$PY" -m pip list 2>/dev/null | grep -iE "cut.cross.entropy|liger|flashinfer" || true
EOF
  step peers build.log 120 bash "$PEERS_SH"
else
  echo "== peers: no wheel folder (--peers DIR or ./peer_wheels): the peer rows will be skipped" >> "$OUTDIR/build.log"
  printf 'peers\tskipped (no wheels)\t0\tbuild.log\t\n' >> "$STEPS"
fi

# ---- 3 GPU tests (real GPU, no interpreter)
step tests-gpu tests_gpu.log 150 "$PY" -m pytest -m gpu -q -n 4 -p no:cacheprovider \
  --junitxml="$SCRATCH/tests_gpu.xml"

# ---- 4 quick benchmarks (run.py stops starting cases 30 s before the step's own limit)
bench() {  # bench CAP JSON [run.py args...]
  local cap=$1 json=$2
  shift 2
  local left
  left=$(left_s)
  (( cap > left )) && cap=$left
  local tl=$(( cap - 30 ))
  (( tl < 10 )) && tl=10
  step "$BENCH_NAME" bench.log "$cap" "$PY" benchmarks/run.py --device cuda --json "$OUTDIR/$json" \
    --time-limit "$tl" "$@"
}
BENCH_NAME=bench bench 180 bench_cuda.json --quick

# ---- 5 the whole suite, CPU paths (GPU hidden so conftest turns on the interpreter and its bf16 patch)
step tests-cpu tests_all.log 180 env CUDA_VISIBLE_DEVICES= TRITON_INTERPRET=1 "$PY" -m pytest -q -n 8 \
  -p no:cacheprovider --junitxml="$SCRATCH/tests_all.xml"

# ---- 6 full benchmarks
if (( FULL )); then
  BENCH_NAME=bench-full bench 600 bench_cuda_full.json
fi

# ---- summary.md
rm -f "$OUTDIR"/*.tmp
SUMMARY_PY=$SCRATCH/summary.py
cat > "$SUMMARY_PY" <<'PYEOF'
import glob, json, os, platform, subprocess, sys, xml.etree.ElementTree as ET

outdir, scratch, total_s, dry = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
L = []
w = L.append


def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        return ""


card = sh("nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader") or "no GPU (nvidia-smi failed)"
vers = {"python": platform.python_version()}
try:
    import torch
    vers["torch"] = f"{torch.__version__} (CUDA {torch.version.cuda})"
except Exception as e:
    vers["torch"] = f"import failed: {e}"
try:
    import triton
    vers["triton"] = triton.__version__
except Exception as e:
    vers["triton"] = f"import failed: {e}"
nvcc = sh("nvcc --version || ${CUDA_HOME:-/usr/local/cuda}/bin/nvcc --version").splitlines()
vers["nvcc"] = nvcc[-1] if nvcc else "not found"
commit = sh("git rev-parse --short HEAD 2>/dev/null") or "unknown"
if commit != "unknown" and sh("git status --porcelain --untracked-files=no 2>/dev/null"):
    commit += " (+ uncommitted changes)"

w("# unif2ace GPU check" + (" (dry run)" if dry else ""))
w("")
w(f"- date: {sh('date -u +%FT%TZ')}, host {platform.node()}, wall time {total_s} s")
w(f"- card: {card}")
w("- " + ", ".join(f"{k} {v}" for k, v in vers.items()))
w(f"- commit: {commit}")
w("")
w("## Steps")
w("")
w("| step | status | seconds | log |")
w("|---|---|---|---|")
steps = []
for line in open(os.path.join(scratch, "steps.tsv")):
    parts = line.rstrip("\n").split("\t")
    steps.append(parts)
    w(f"| {parts[0]} | {parts[1]} | {parts[2]} | {parts[3]} |")
w("")

w("## Tests")
w("")
w("| run | passed | failed | errors | skipped | total | seconds |")
w("|---|---|---|---|---|---|---|")
failures = []
for name in ("tests_gpu", "tests_all"):
    path = os.path.join(scratch, name + ".xml")
    if not os.path.exists(path):
        w(f"| {name} | - | - | - | - | no junit xml (see {name}.log) | - |")
        continue
    try:
        root = ET.parse(path).getroot()
        suites = [root] if root.tag == "testsuite" else list(root)
        t = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
        secs = sum(float(s.get("time", 0)) for s in suites)
        passed = t["tests"] - t["failures"] - t["errors"] - t["skipped"]
        w(f"| {name} | {passed} | {t['failures']} | {t['errors']} | {t['skipped']} | {t['tests']} | {secs:.0f} |")
        for case in root.iter("testcase"):
            for kind in ("failure", "error"):
                el = case.find(kind)
                if el is not None:
                    msg = (el.get("message") or el.text or "").strip().splitlines()
                    failures.append(f"{name}: {case.get('classname')}::{case.get('name')} [{kind}] "
                                    f"{msg[0][:200] if msg else ''}")
    except Exception as e:
        w(f"| {name} | - | - | - | - | unreadable junit xml: {e} | - |")
if failures:
    w("")
    w(f"Failing tests ({len(failures)}):")
    w("")
    for f in failures[:40]:
        w(f"- {f}")
    if len(failures) > 40:
        w(f"- ... and {len(failures) - 40} more (see the logs)")
w("")


def fmt(x, f="{:.3g}"):
    return "-" if x is None else f.format(x)


for jname in ("bench_cuda.json", "bench_cuda_full.json"):
    path = os.path.join(outdir, jname)
    if not os.path.exists(path):
        continue
    w(f"## Benchmarks ({jname})")
    w("")
    try:
        recs = json.load(open(path))
    except Exception as e:
        w(f"unreadable: {e}")
        w("")
        continue
    ok = [r for r in recs if r.get("status") == "ok"]
    bad = [r for r in recs if r.get("status") != "ok"]
    if recs:
        r0 = recs[0]
        w(f"{r0.get('device_name')}, torch {r0.get('torch')}, triton {r0.get('triton')}, {r0.get('date')}: "
          f"{len(ok)} measured, {sum(r.get('status') == 'skipped' for r in recs)} skipped, "
          f"{sum(r.get('status') == 'error' for r in recs)} failed")
        w("")
    flush = {r.get("l2_flush") for r in recs if r.get("device") == "cuda"}
    if flush:
        w(f"Timing: CUDA events, L2 {'flushed' if flush == {True} else 'not flushed' if flush == {False} else flush}"
          " before every timed call; % limit: of the same run's torch.mm rate at the op's GEMM shapes, or of"
          " its copy bandwidth (the rows of kind limit).")
        w("")
    w("| op | case | backend | kind | dtype | mode | median ms | p20-p80 | peak MB | GB/s | %BW | TFLOP/s | %TF | vs ref | vs compile | % limit |")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in ok:
        if r.get("kind") == "limit":
            w(f"| {r['op']} | {r['case']} | limit | limit | {r['dtype']} | {r['mode']} | {fmt(r['median_ms'])} | "
              f"{r.get('limit') or ''} | | | | | | | | 100 |")
            continue
        w(f"| {r['op']} | {r['case']} | {r['backend']} | {r.get('kind') or ''} | {r['dtype']} | {r['mode']} | {fmt(r['median_ms'])} | "
          f"{fmt(r['p20_ms'])}-{fmt(r['p80_ms'])} | {fmt(r['peak_mem_mb'], '{:.1f}')} | {fmt(r['gbps'], '{:.0f}')} | "
          f"{fmt(r['pct_peak_bw'], '{:.0f}')} | {fmt(r['tflops'], '{:.1f}')} | {fmt(r['pct_peak_tflops'], '{:.0f}')} | "
          f"{fmt(r['speedup_vs_reference'], '{:.2f}x')} | {fmt(r['speedup_vs_compile'], '{:.2f}x')} | "
          f"{fmt(r.get('pct_limit'), '{:.3g}')} |")
    if bad:
        w("")
        w("Not measured (status: reason -> rows):")
        w("")
        groups = {}
        for r in bad:
            key = (r.get("status"), r.get("backend"), r.get("reason"))
            groups.setdefault(key, []).append(f"{r.get('op') or r.get('family')} {r.get('case') or ''}".strip())
        for (status, backend, reason), where in groups.items():
            uniq = sorted(set(where))
            w(f"- {status} `{backend}`: {reason} -> {', '.join(uniq[:6])}{' ...' if len(uniq) > 6 else ''}")
    w("")

open(os.path.join(outdir, "summary.md"), "w").write("\n".join(L) + "\n")
PYEOF
TOTAL=$(( $(date +%s) - T0 ))
if ! "$PY" "$SUMMARY_PY" "$OUTDIR" "$SCRATCH" "$TOTAL" "$DRY" 2> "$SCRATCH/summary.err"; then
  {  # the Python summary failed (no usable python?): write the essentials from bash
    echo "# unif2ace GPU check"
    echo
    echo "- date: $(date -u +%FT%TZ), wall time ${TOTAL} s"
    echo "- card: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo 'no GPU (nvidia-smi failed)')"
    echo "- summary.py failed: $(tail -n 3 "$SCRATCH/summary.err" | tr '\n' ' ')"
    echo
    echo "| step | status | seconds | log |"
    echo "|---|---|---|---|"
    while IFS=$'\t' read -r n s d l _; do echo "| $n | $s | $d | $l |"; done < "$STEPS"
  } > "$OUTDIR/summary.md"
fi
cat "$OUTDIR/summary.md"
log "done in ${TOTAL}s; results in $OUTDIR ($(ls "$OUTDIR" | wc -l) files)"
if cut -f2 "$STEPS" | grep -qvE '^(ok|dry-run|skipped \((--skip-build|no wheels)\))'; then exit 1; fi
exit 0
