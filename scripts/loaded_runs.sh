#!/usr/bin/env bash
# Run the whole suite RUNS times in a row (default 10), each in a fresh random order, while a
# busy process keeps every core busy; stop at the first failure. This is how order
# dependence and wall-clock assumptions show up before CI's busy machines find them.
#
#   bash scripts/loaded_runs.sh                  # 10 runs, busy load at nice 10, no coverage
#   RUNS=3 BUSY_NICE=0 bash scripts/loaded_runs.sh
#   NICHE_COVERAGE=1 bash scripts/loaded_runs.sh # the exact CI command (floors included)
#
# The busy process is one Python parent with one spinning child per core (BUSY_PROCS, default
# nproc) at BUSY_NICE (0 = the suite's own priority: each core shared about half and half).
# Each run's log is kept in LOADED_DIR (default .loaded-runs/); summary.tsv has one line per
# run: run, exit code, seconds, the pytest-randomly seed, the pytest summary line.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${RUNS:-10}"
BUSY_NICE="${BUSY_NICE:-10}"
BUSY_PROCS="${BUSY_PROCS:-$(nproc)}"
DIR="${LOADED_DIR:-.loaded-runs}"
export NICHE_COVERAGE="${NICHE_COVERAGE:-0}"
mkdir -p "$DIR"
bash scripts/setup.sh >/dev/null

nice -n "$BUSY_NICE" python3 - "$BUSY_PROCS" <<'EOF' &
import multiprocessing, sys

def spin() -> None:
    while True:
        pass

if __name__ == "__main__":
    children = [multiprocessing.Process(target=spin, daemon=True) for _ in range(int(sys.argv[1]))]
    for c in children:
        c.start()
    for c in children:
        c.join()
EOF
busy=$!
trap 'pkill -P "$busy" 2>/dev/null; kill "$busy" 2>/dev/null || true' EXIT
echo "[loaded] busy process $busy: $BUSY_PROCS spinning children at nice $BUSY_NICE"
printf 'run\trc\tseconds\tseed\tsummary\n' > "$DIR/summary.tsv"
for run in $(seq 1 "$RUNS"); do
    log="$DIR/run$run.log"
    start=$(date +%s)
    rc=0
    bash scripts/test.sh "$@" > "$log" 2>&1 || rc=$?
    seconds=$(( $(date +%s) - start ))
    seed=$(grep -o -m1 'randomly-seed=[0-9]*' "$log" | cut -d= -f2 || true)
    summary=$(grep -E '^(=+ )?[0-9]+ (passed|failed)|[0-9]+ (passed|failed).* in ' "$log" \
              | tail -1 | tr -d '=' | sed 's/^ *//;s/ *$//' || true)
    printf '%s\t%s\t%s\t%s\t%s\n' "$run" "$rc" "$seconds" "${seed:--}" "$summary" \
        >> "$DIR/summary.tsv"
    echo "[loaded] run $run/$RUNS: exit $rc in ${seconds}s, seed ${seed:--}: $summary"
    if [ "$rc" != 0 ]; then
        echo "[loaded] stopped: run $run failed; its log is $log (replay the order with" \
             "-p randomly --randomly-seed=$seed)"
        exit "$rc"
    fi
done
echo "[loaded] $RUNS runs in a row passed under load; $DIR/summary.tsv"
