#!/usr/bin/env bash
# Mutation testing (mutmut 3) of the modules whose numbers the tests pin. Not part of CI: all
# five take about 8 minutes on 2 cores (per-module figures in docs/testing.md).
#
#   scripts/mutation.sh                 all five modules
#   scripts/mutation.sh scoring auth    only these (scoring verify challenges auth limits)
#
# Each module is mutated in its own scratch copy of the repository (MUTATION_WORKDIR, default
# $TMPDIR/niche-mutation/<module>) against only the test files that target it, so one
# module's run never waits on another module's tests. Per module it prints the totals and,
# for every mutant that survived, its diff; a survivor whose name is listed in
# docs/testing.md (as `niche.<module>.x_<function>__mutmut_<n>`) is reported as a known
# equivalent mutant rather than a failure. Exit status: 0 when every survivor is a listed
# equivalent, 1 otherwise.
#
# Environment: PYTHON (default: the checkout's .venv/bin/python, else python on PATH; needs
# mutmut>=3.8, from the dev extra),
# MUTATION_JOBS (parallel mutants, default 2), MUTATION_WORKDIR (scratch, default above),
# MUTATION_KEEP=1 to reuse a previous run's results (mutmut only reruns changed mutants).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python
    [ -x "$ROOT/.venv/bin/python" ] && PYTHON="$ROOT/.venv/bin/python"
fi
JOBS=${MUTATION_JOBS:-2}
WORK=${MUTATION_WORKDIR:-${TMPDIR:-/tmp}/niche-mutation}
DOC="$ROOT/docs/testing.md"
ALL=(scoring verify challenges auth limits)

source_of() {
    case "$1" in
        scoring) echo niche/validator/scoring.py ;;
        verify) echo niche/validator/verify.py ;;
        challenges) echo niche/validator/challenges.py ;;
        auth) echo niche/auth.py ;;
        limits) echo niche/miner/limits.py ;;
        *) return 1 ;;
    esac
}

# pytest arguments (TOML strings) that select the tests aimed at a module. Tests that load
# the tiny checkpoints or start a local network are left out: ~12 s of setup per mutant.
tests_of() {
    case "$1" in
        scoring) echo '"tests/test_pin_scoring.py", "tests/test_validator_scoring.py"' ;;
        verify) echo '"tests/test_pin_verify.py", "-m", "not slow",
            "tests/test_verify_hardened.py::test_float32_compare_agrees_with_float64",
            "tests/test_validator_verify.py::test_compare_basics",
            "tests/test_validator_verify.py::test_operator_thresholds_layer_on_the_calibrated_defaults"' ;;
        challenges) echo '"tests/test_pin_challenges.py", "tests/test_validator_challenges.py",
            "--deselect", "tests/test_validator_challenges.py::test_canny_challenges_have_edges_to_follow"' ;;
        auth) echo '"tests/test_pin_auth.py"' ;;
        limits) echo '"tests/test_pin_limits.py",
            "tests/test_miner_queue.py::test_gate_serves_highest_stake_first",
            "tests/test_miner_queue.py::test_gate_refuses_what_cannot_finish_in_time_and_when_full",
            "tests/test_miner_queue.py::test_cancelled_waiter_does_not_leak_the_slot",
            "tests/test_miner_queue.py::test_rate_limiter_token_bucket_and_stake_share"' ;;
    esac
}

modules=("$@")
[ ${#modules[@]} -eq 0 ] && modules=("${ALL[@]}")
for m in "${modules[@]}"; do
    source_of "$m" >/dev/null || { echo "unknown module '$m' (one of: ${ALL[*]})" >&2; exit 2; }
done
"$PYTHON" -c "import mutmut" 2>/dev/null || {
    echo "mutmut is not installed for $PYTHON: pip install -e '.[dev]'" >&2; exit 2; }

listed_equivalents() {
    [ -f "$DOC" ] && grep -o 'niche\.[^ `]*__mutmut_[0-9]*' "$DOC" | sort -u || true
}

failed=0
summary=()
for m in "${modules[@]}"; do
    src=$(source_of "$m")
    dir="$WORK/$m"
    if [ "${MUTATION_KEEP:-0}" != 1 ]; then rm -rf "$dir"; fi
    mkdir -p "$dir"
    # a scratch copy: the package, the tests, the pytest settings plus mutmut's
    rm -rf "$dir/niche" "$dir/tests"
    cp -a "$ROOT/niche" "$ROOT/tests" "$dir/"
    find "$dir/niche" "$dir/tests" -name __pycache__ -prune -exec rm -rf {} +
    {
        cat "$ROOT/pyproject.toml"
        cat <<EOF

[tool.mutmut]
source_paths = ["niche"]
only_mutate = ["$src"]
pytest_add_cli_args = ["-p", "no:cacheprovider", "-q"]
pytest_add_cli_args_test_selection = [$(tests_of "$m")]
use_git_change_detection = false
EOF
    } >"$dir/pyproject.toml"

    echo "=== $m: mutating $src"
    start=$(date +%s)
    (cd "$dir" && env -u PYTHONPATH "$PYTHON" -m mutmut run --max-children "$JOBS" \
        >"$dir/run.log" 2>&1) || { echo "mutmut run failed for $m; see $dir/run.log" >&2
                                  tail -20 "$dir/run.log" >&2; failed=1; continue; }
    took=$(( $(date +%s) - start ))
    (cd "$dir" && env -u PYTHONPATH "$PYTHON" -m mutmut results --all true >"$dir/results.txt")
    total=$(grep -c '__mutmut_' "$dir/results.txt" || true)
    killed=$(grep -c ': killed$' "$dir/results.txt" || true)
    # a mutant that made its tests hang past mutmut's limit was detected too
    timeouts=$(grep -c ': timeout$' "$dir/results.txt" || true)
    grep ': timeout$' "$dir/results.txt" | sed 's/^ */--- /; s/$/ (counted as killed)/' || true
    survivors=$(grep -v ': killed$\|: timeout$' "$dir/results.txt" \
        | sed -n 's/^ *\([^:]*\): .*/\1/p')
    equivalent=0
    unexplained=0
    for name in $survivors; do
        status=$(sed -n "s/^ *$name: //p" "$dir/results.txt")
        if listed_equivalents | grep -qx "$name"; then
            equivalent=$((equivalent + 1))
            echo "--- $name: $status (listed as equivalent in docs/testing.md)"
        else
            unexplained=$((unexplained + 1))
            echo "--- $name: $status"
            (cd "$dir" && env -u PYTHONPATH "$PYTHON" -m mutmut show "$name" | sed 1d)
        fi
    done
    [ "$unexplained" -gt 0 ] && failed=1
    summary+=("$(printf '%-11s %4d mutants  %4d killed  %3d timed out  %3d equivalent (listed)  %3d unexplained  %5ds' \
        "$m" "$total" "$killed" "$timeouts" "$equivalent" "$unexplained" "$took")")
done

echo
echo "=== summary"
printf '%s\n' "${summary[@]}"
exit "$failed"
