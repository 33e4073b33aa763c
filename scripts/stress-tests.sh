#!/usr/bin/env bash
# The README's test command on a machine that is busy: two processes spinning on the cores and,
# beside them, a whole demo run (`m3 run -c configs/demo.yaml`, another Ray cluster on this
# machine, in a bank of its own). The suite must pass as it does on idle cores.
#
#     bash scripts/stress-tests.sh [pytest args...]
#
# Prints the suite's wall time; the demo's output goes to $STRESS_DIR/demo.log. Everything the
# script starts is in its own process group and is stopped when the suite ends.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh

STRESS_DIR=${STRESS_DIR:-$(mktemp -d /tmp/m3-stress-XXXX)}
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM -- "-$p" 2>/dev/null || true; done
    sleep 2
    for p in "${pids[@]}"; do kill -KILL -- "-$p" 2>/dev/null || true; done
}
trap cleanup EXIT

for i in 1 2; do  # a busy loop per core, at normal priority
    setsid python3 -c "while True: pass" & pids+=($!)
done
setsid .venv/bin/m3 run -c configs/demo.yaml --set "bank.uri=$STRESS_DIR/bank" >"$STRESS_DIR/demo.log" 2>&1 &
pids+=($!)

start=$(date +%s)
set +e
.venv/bin/python -m pytest -q "$@"
status=$?
set -e
echo "stress-tests: suite exit $status in $(( $(date +%s) - start )) s beside 2 busy loops and a demo run ($STRESS_DIR/demo.log)"
exit $status
