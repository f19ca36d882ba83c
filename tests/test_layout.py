"""The package's one-way rules, checked on the source: serving code never imports the test
world (niche.devnet), and argparse lives only in the command layer."""
from __future__ import annotations

import ast
from pathlib import Path

import niche

ROOT = Path(niche.__file__).parent
COMMAND_LAYER = {"cli.py", "commands"}


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _serving_files() -> list[Path]:
    files = []
    for path in sorted(ROOT.rglob("*.py")):
        top = path.relative_to(ROOT).parts[0]
        if top != "devnet" and top not in COMMAND_LAYER:
            files.append(path)
    return files


def test_serving_code_never_imports_devnet():
    files = _serving_files()
    assert len(files) > 30  # the walk found the package, not an empty folder
    offenders = {str(f.relative_to(ROOT)): sorted(n for n in _imports(f)
                                                 if n.startswith("niche.devnet"))
                 for f in files}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_argparse_only_in_the_command_layer():
    offenders = [str(f.relative_to(ROOT)) for f in _serving_files()
                 if "argparse" in _imports(f)]
    assert offenders == []


def test_the_rules_see_lazy_imports(tmp_path):
    """The check reads imports inside functions too (where this code base puts heavy ones)."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from niche.devnet.tiny import ensure_tiny_models\n")
    assert "niche.devnet.tiny" in _imports(probe)
