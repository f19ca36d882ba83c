"""Branch-coverage floors per package: a table, and exit status 1 when one is missed.

Coverage itself only has a global `fail_under`; the parts of niche that a mistake costs most
in (what a miner serves, what a validator scores, how requests are signed, the local chain)
get their own floor here. Run after `coverage combine`, as scripts/test.sh does:

    python scripts/coverage_floors.py [--data-file .coverage] [--report-only]

The percentage is coverage's own branch-aware figure for the files of each package
((executed lines + taken branches) / (lines + branches), over all its files): the TOTAL
row of `coverage report --include=<package>`.
`--report-only` prints the table but always exits 0 (a run that selected only some tests).
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import coverage

ROOT = Path(__file__).resolve().parent.parent

# (name, path under the repository, floor in percent). A path ending in "/" is a package.
FLOORS: list[tuple[str, str, float]] = [
    ("niche/validator", "niche/validator/", 90.0),
    ("niche/miner", "niche/miner/", 90.0),
    ("niche/auth.py", "niche/auth.py", 90.0),
    ("niche/imaging.py", "niche/imaging.py", 90.0),
    ("niche/chain/local.py", "niche/chain/local.py", 90.0),
]


def measure(data_file: Path) -> dict[str, float | None]:
    """Branch-aware coverage percentage per floor (None: no file of it was measured)."""
    cov = coverage.Coverage(data_file=str(data_file), config_file=str(ROOT / "pyproject.toml"))
    cov.load()
    if not cov.get_data().has_arcs():
        raise SystemExit("coverage data has no branch information: run with `branch = true`")
    results: dict[str, float | None] = {}
    for name, path, _ in FLOORS:
        pattern = str(ROOT / path) + ("/**/*" if path.endswith("/") else "")
        try:
            # the same figure `coverage report` prints in its TOTAL row for these files
            results[name] = cov.report(include=[pattern], file=io.StringIO(), precision=1)
        except coverage.exceptions.NoDataError:
            results[name] = None
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-file", type=Path, default=ROOT / ".coverage")
    parser.add_argument("--report-only", action="store_true",
                        help="print the table, never fail (a run of selected tests only)")
    args = parser.parse_args(argv)
    if not args.data_file.exists():
        print(f"coverage floors: no coverage data at {args.data_file}", file=sys.stderr)
        return 0 if args.report_only else 1
    results = measure(args.data_file)
    failed = []
    print(f"{'package':<24} {'branch cov':>10} {'floor':>7}  result")
    for name, _, floor in FLOORS:
        pct = results[name]
        if pct is None:
            pct, verdict = 0.0, "NOT MEASURED"
        else:
            verdict = "ok" if pct >= floor else "BELOW FLOOR"
        if verdict != "ok":
            failed.append((name, pct, floor, verdict))
        print(f"{name:<24} {pct:>9.1f}% {floor:>6.1f}%  {verdict}")
    if not failed:
        print("coverage floors: all met")
        return 0
    if args.report_only:
        print("coverage floors: not enforced (only some tests were selected)")
        return 0
    for name, pct, floor, verdict in failed:
        print(f"coverage floors: FAILED: {name} {verdict.lower()}: {pct:.1f}% branch coverage, "
              f"floor {floor:.1f}%", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
