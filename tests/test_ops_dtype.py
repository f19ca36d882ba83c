"""One default dtype: `niche generate`/`verify`, the miner and the validator all load a model in
its configured dtype unless `--dtype` says otherwise, so `generate` reproduces a miner."""
from __future__ import annotations

import pytest

from niche.cli import build_parser, main
from niche.models.spec import load_spec
from niche.states import load_states_file

COMMAND_LINES = {
    "generate": ["generate", "--model", "kolors", "--prompt", "x", "--seed", "1",
                 "--out", "a.png"],
    "verify": ["verify", "--model", "kolors", "--prompt", "x", "--seed", "1",
               "--candidate", "a.png"],
    "miner": ["miner", "--netuid", "1"],
    "validator": ["validator", "--netuid", "1"],
}


@pytest.mark.parametrize("command", sorted(COMMAND_LINES))
def test_every_command_defaults_to_the_models_dtype(command):
    args = build_parser().parse_args(COMMAND_LINES[command])
    assert args.dtype is None  # None: the engine takes each model's configured dtype


def test_generate_runs_the_configured_dtype_and_dtype_overrides(tmp_path, capsys):
    base = ["generate", "--tiny", "--model", "kolors", "--prompt", "a red circle", "--seed",
            "3", "--num-threads", "1", "--out", str(tmp_path / "a.png")]
    assert main([*base, "--states-out", str(tmp_path / "default.states")]) == 0
    assert main([*base, "--dtype", "float32", "--states-out", str(tmp_path / "f32.states")]) == 0
    capsys.readouterr()
    _, default_dtype = load_states_file(tmp_path / "default.states")
    _, explicit = load_states_file(tmp_path / "f32.states")
    configured = load_spec("kolors").dtype
    assert configured != "float32"  # the test means something only if the config is half
    assert default_dtype == configured
    assert explicit == "float32"
