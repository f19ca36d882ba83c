"""constraints/gpu.txt pins every runtime dependency, inside pyproject's ranges, and is what
scripts/setup.sh installs with on a GPU box."""
from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints" / "gpu.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_every_dependency_is_pinned_within_its_range():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = _pins()
    for dep in map(Requirement, deps):
        name = canonicalize_name(dep.name)
        assert name in pins, f"{dep.name} has no pin in constraints/gpu.txt"
        assert dep.specifier.contains(pins[name], prereleases=True), (dep, pins[name])


def test_setup_installs_with_the_constraints_on_gpu():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "-c constraints/gpu.txt" in setup
    assert '"${CONSTRAINTS[@]}" -e ".[dev,ray]"' in setup
