"""Running the real `niche` CLI as a subprocess, and reading its one-line errors."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NICHE = [sys.executable, "-m", "niche.cli"]


def one_line_error(done: subprocess.CompletedProcess, code: int = 2) -> str:
    """The process's single stderr line (library chatter aside): `error: ...`, exit `code`."""
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1, done.stderr
    return lines[0]
