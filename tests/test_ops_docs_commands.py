"""Every command in README.md and docs/*.md runs as written with the tools set-up installs.

Convention (docs/testing.md "Commands in the docs"): a fence opened with ```bash offline
holds lines that need no network, no GPU and no wallet with funds: this test RUNS them, in
order, in one bash per block (real niche, real pm2 from node_modules). Every other ```bash
line is checked without running it: `niche` lines are parsed by niche's own argparse,
`btcli` and `hf` lines have every --flag checked against that tool's `--help` of the same
subcommand, `pm2` lines name a pm2 command, `bash scripts/X` names a file that exists, and
no other program is used than these and a few shell built-ins."""
from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from niche.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
GUIDES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_FENCES = ("bash", "sh", "shell", "console")
SHELL_BUILTINS = {"cd", "source", "export", "echo", "git", "npm", "python", "sleep", "cat"}
TOOLS = {"niche", "btcli", "hf", "pm2", "bash", "curl", "ray"}  # curl: in every base image
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Block:
    guide: Path
    line: int
    info: str
    lines: tuple[str, ...]

    @property
    def offline(self) -> bool:
        return "offline" in self.info.split()[1:]

    def where(self, text: str) -> str:
        return f"{self.guide.relative_to(REPO)}:{self.line}: {text}"


def shell_blocks() -> list[Block]:
    blocks = []
    for guide in GUIDES:
        lines = guide.read_text().splitlines()
        i = 0
        while i < len(lines):
            match = re.match(r"^```(\S*)(.*)$", lines[i])
            if not match:
                i += 1
                continue
            start, info, body = i + 1, (match.group(1) + match.group(2)).strip(), []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            i += 1
            if info.split()[:1] and info.split()[0] in SHELL_FENCES:
                blocks.append(Block(guide, start, info, tuple(body)))
    return blocks


def commands(block: Block) -> list[list[str]]:
    """Each simple command of the block as argv (continuations joined, comments, env
    assignments and `$ ` prompts dropped; output lines of a console block skipped)."""
    text, out = [], []
    for raw in block.lines:
        if block.info.startswith("console"):
            if not raw.startswith("$ "):
                continue
            raw = raw[2:]
        text.append(raw)
    joined = "\n".join(text).replace("\\\n", " ")
    for line in joined.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        argv: list[str] = []
        for token in [*lexer, ";"]:
            if token in (";", "&&", "||", "|", "&"):
                while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):
                    argv.pop(0)
                if argv:
                    out.append(argv)
                argv = []
            else:
                argv.append(token)
    return out


def _flags(argv: list[str]) -> tuple[list[str], list[str]]:
    words = []
    for token in argv[1:]:
        if token.startswith("-"):
            break
        words.append(token)
    flags = [t.split("=")[0] for t in argv[1:] if t.startswith("--")]
    return words, flags


@functools.cache
def _help(tool: str, words: tuple[str, ...]) -> str:
    exe = BIN / tool
    proc = subprocess.run([str(exe if exe.exists() else tool), *words, "--help"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"})
    assert proc.returncode == 0, f"{tool} {' '.join(words)} --help: {proc.stderr[-500:]}"
    return proc.stdout + proc.stderr


def _pm2() -> Path | None:
    pm2 = REPO / "node_modules" / ".bin" / "pm2"
    return pm2 if pm2.exists() else None


def check(argv: list[str]) -> str | None:
    """None when `argv` is fine as written, else why not."""
    tool = argv[0].removeprefix(".venv/bin/").removeprefix("node_modules/.bin/")
    argv = [tool, *argv[1:]]
    if tool in SHELL_BUILTINS:
        return None
    if tool not in TOOLS:
        return f"{tool} is not a tool the set-up installs"
    if tool == "niche":
        # a shell variable the reader sets first (`export NETUID=...`) parses as its value
        argv = [re.sub(r"\$\{?[A-Z_][A-Z0-9_]*\}?", "1", a) for a in argv]
        try:
            build_parser().parse_args(argv[1:])
        except SystemExit as exc:
            return None if exc.code == 0 else f"niche rejects {shlex.join(argv)}"
        return None
    if tool == "bash":
        script = next((a for a in argv[1:] if not a.startswith("-")), None)
        return None if script and (REPO / script).is_file() else f"no script {script}"
    if tool == "pm2":
        if _pm2() is None:
            pytest.skip("pm2 is not installed (bash scripts/setup.sh installs it)")
        verbs = {"start", "stop", "restart", "delete", "logs", "status", "save", "startup",
                 "install", "set", "list", "kill", "jlist", "monit", "reload", "flush"}
        return None if argv[1] in verbs else f"pm2 has no command {argv[1]}"
    words, flags = _flags(argv)
    text = _help(tool, tuple(words))
    unknown = [f for f in flags if not re.search(re.escape(f) + r"(?![\w-])", text)]
    return f"{tool} {' '.join(words)} has no {', '.join(unknown)}" if unknown else None


def test_every_shell_line_of_the_guides_is_valid():
    problems = []
    for block in shell_blocks():
        for argv in commands(block):
            why = check(argv)
            if why:
                problems.append(block.where(why))
    assert not problems, "\n".join(problems)


INLINE_TOOLS = ("btcli ", "hf ", "huggingface-cli ")


def test_inline_tool_commands_are_valid_too():
    """`btcli ...`, `hf ...` in running text: operators copy those as well."""
    problems = []
    for guide in GUIDES:
        for span in re.findall(r"`([^`\n]+)`", guide.read_text()):
            if span.startswith(INLINE_TOOLS) and "..." not in span:
                why = check(shlex.split(span))
                if why:
                    problems.append(f"{guide.relative_to(REPO)}: {why}")
    assert not problems, "\n".join(problems)


def test_the_checker_catches_what_broke_before():
    """The lines issue 16 found broken, as the checker sees them."""
    assert "has no --wallet.name" in check(
        ["btcli", "subnets", "register", "--netuid", "23", "--wallet.name", "miner"])
    assert check(["huggingface-cli", "login"]) == ("huggingface-cli is not a tool the set-up "
                                                   "installs")
    assert check(["niche", "miner", "--netuid", "23", "--axon.port", "8091"]) is None
    assert check(["btcli", "subnets", "register", "--netuid", "23", "--wallet", "m",
                  "--wallet-hotkey", "default", "--network", "finney"]) is None


def test_guides_cite_no_missing_file():
    """Links and `path` mentions of repository files resolve (no changelog that is not
    there)."""
    missing = []
    for guide in GUIDES:
        text = guide.read_text()
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            if not (guide.parent / target).exists():
                missing.append(f"{guide.name}: {target}")
        if re.search(r"\bchangelog\b", text, re.I) and not (REPO / "CHANGELOG.md").exists():
            missing.append(f"{guide.name}: cites a changelog, no CHANGELOG.md")
    assert not missing, missing


OFFLINE = [b for b in shell_blocks() if b.offline]


def test_there_are_offline_blocks():
    assert len(OFFLINE) >= 2 and any(b.guide.name == "README.md" for b in OFFLINE)


@pytest.mark.slow
@pytest.mark.parametrize("block", OFFLINE, ids=lambda b: f"{b.guide.name}:{b.line}")
def test_offline_blocks_run_as_written(block, tmp_path, tiny_root):
    script = "\n".join(block.lines)
    if ("pm2" in script or "rehearse" in script) and _pm2() is None:
        pytest.skip("pm2 is not installed (bash scripts/setup.sh installs it)")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{REPO / 'node_modules' / '.bin'}"
           f"{os.pathsep}{os.environ.get('PATH', '')}",
           "NICHE_TINY_DIR": str(tiny_root), "NICHE_BIN": str(BIN / "niche"),
           "PM2_HOME": str(tmp_path / "pm2"), "REHEARSAL_DIR": str(tmp_path / "rehearsal"),
           "HOME": str(tmp_path / "home")}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    if shutil.which("node") and _pm2() is not None:
        subprocess.run([str(_pm2()), "kill"], env=env, capture_output=True, timeout=60)
    assert proc.returncode == 0, block.where(proc.stdout[-2000:] + proc.stderr[-2000:])
