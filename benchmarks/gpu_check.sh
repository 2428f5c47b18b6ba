#!/usr/bin/env bash
# The one command for the GPU machine: GPU tests, then the peer benchmarks.
#
#   bash benchmarks/gpu_check.sh            # from the repository root; carry .peer for tokamax
#
# Writes under $OUT: gpu_tests.log, bench.log, nvidia-smi.txt, pip.log and
# results/ (<suite>-<device>-<date>.{json,md,png} and logs/ of every peer
# process). Prints the Markdown tables last. Finishes within TOTAL_S seconds
# (default 540 = 9 minutes): the tests get at most TEST_TIMEOUT, the
# benchmarks what is left (their --time-budget), minus a margin for reports.
#
# Environment knobs:
#   SUITES=dense,mods       suites to run (dense, mods, decode)
#   BENCH_ARGS="..."        extra arguments, e.g. "--peers attnax,cudnn --cases 'd128*'"
#   SKIP_TESTS=1            skip the GPU tests (all the time goes to the benchmarks)
#   TEST_TIMEOUT=150        seconds for the GPU tests
#   TOTAL_S=540             wall-clock limit of the whole script
#   PYTHON=python3
set -o pipefail
START=$(date +%s)
TOTAL=${TOTAL_S:-540}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/attnax-gpu-check}
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
elapsed() { echo $(( $(date +%s) - START )); }

# -- environment ----------------------------------------------------------------
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed" >> "$OUT/nvidia-smi.txt"
echo "== $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1) | $($PY --version 2>&1)"

# tokamax (Python 3.12, jax >= 0.11.1) and its missing dependencies, from the
# wheels the lead carries in .peer/ (see GPU.md); xprof is a stub.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if ls .peer/*.whl > /dev/null 2>&1; then
  if $PY -m pip install -q --no-index --no-deps --target /tmp/site .peer/*.whl > "$OUT/pip.log" 2>&1; then
    export PYTHONPATH="$ROOT:/tmp/site:$ROOT/.peer/stubs${PYTHONPATH#"$ROOT"}"
  else
    echo "== tokamax wheels failed to install (see pip.log): tokamax peers will be 'unavailable'"
  fi
else
  echo "== no .peer/ wheels: tokamax peers will be 'unavailable'"
fi
$PY - > "$OUT/versions.txt" 2>&1 <<'EOF'
import importlib.metadata as md
for d in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "torch", "triton", "tokamax", "flax", "pytest"):
    try:
        print(d, md.version(d))
    except md.PackageNotFoundError:
        print(d, "-")
EOF
echo "== $(tr '\n' ' ' < "$OUT/versions.txt")"

# -- GPU tests (failures do not stop the script) ----------------------------------
if [ -z "${SKIP_TESTS:-}" ]; then
  echo "== GPU tests (at most ${TEST_TIMEOUT:-150} s)"
  timeout -k 10 "${TEST_TIMEOUT:-150}" $PY -m pytest -m gpu -q -x -p no:cacheprovider tests 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -n 25
  echo "== GPU tests: exit ${PIPESTATUS[0]} after $(elapsed) s (full log: gpu_tests.log)"
fi

# -- benchmarks -------------------------------------------------------------------
LEFT=$(( TOTAL - $(elapsed) - 45 ))
BUDGET=${TIME_BUDGET:-$LEFT}
[ "$BUDGET" -lt 60 ] && BUDGET=60
echo "== benchmarks: suites ${SUITES:-dense,mods}, budget ${BUDGET} s (log: bench.log)"
# SIGTERM at the budget + margin: the harness then kills its peer process and
# still writes the reports of what ran.
eval "timeout -k 15 $(( BUDGET + 35 )) $PY -m benchmarks --suite ${SUITES:-dense,mods} --out \"$OUT/results\" \
  --time-budget $BUDGET --quiet ${BENCH_ARGS:-}" > "$OUT/bench.log" 2>&1
RC=$?
if [ "$RC" -ne 0 ]; then
  echo "== benchmarks exited $RC; the end of bench.log:"
  tail -n 40 "$OUT/bench.log" | cut -c1-300
else
  grep -E "error|timeout|FAILED|skipped" "$OUT/bench.log" | grep -v "^ *$" | cut -c1-200 | tail -n 20
fi
echo "== done in $(elapsed) s; results in \$OUT/results (copy them to benchmarks/results/)"

# -- the tables, last ---------------------------------------------------------------
for s in dense mods decode; do
  for f in "$OUT"/results/"$s"-*.md; do
    [ -e "$f" ] || continue
    echo
    sed -e '/^Cases:/,/^$/d' "$f" | cut -c1-700
  done
done
