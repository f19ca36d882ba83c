"""`niche validator status`: a real state file written by ValidatorState, printed as a table
and as JSON, without a chain or models."""
from __future__ import annotations

import json

from niche.cli import main
from niche.validator.scoring import Outcome, ScoreBook, ScoringConfig, UidScore
from niche.validator.state import ValidatorState


def _state(path):
    book = ScoreBook(cfg=ScoringConfig())
    book.uids = {1: UidScore("5Honest1111111111", 0.42, "flux-schnell"),
                 2: UidScore("5Cheat22222222222", 0.0, "kolors")}
    book.excluded_until = {"5Cheat22222222222": 52}
    with ValidatorState(path) as state:
        state.save_round(0, book, [Outcome(1, "5Honest1111111111", "flux-schnell")], {1: 0.5})
        state.save_round(1, book, [Outcome(1, "5Honest1111111111", "flux-schnell", latency=1.0),
                                   Outcome(2, "5Cheat22222222222", "kolors",
                                           status="excluded")], {1: 0.6})
        state.record_weights(1, 140, {1: 1.0}, True, "included")


def test_status_table_and_json(tmp_path, capsys):
    path = tmp_path / "state.sqlite"
    _state(path)
    assert main(["validator", "status", "--state", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["rounds_completed"] == 2 and data["last_round"] == 1
    assert [(s["uid"], s["score"], s["last_status"], s["excluded_until"])
            for s in data["scores"]] == [(1, 0.42, "ok", None), (2, 0.0, "excluded", 52)]
    assert data["exclusions"] == [{"hotkey": "5Cheat22222222222", "until_round": 52}]
    assert data["last_weights"] == {"round": 1, "block": 140, "message": "included",
                                    "weights": {"1": 1.0}}
    assert main(["validator", "status", "--state", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "2 round(s) completed, last round 1" in lines[0]
    assert lines[1] == "last weights: round 1, block 140, 1 uid(s) (included)"
    assert lines[3].split() == ["1", "5Hones..1111", "flux-schnell", "0.4200", "1.0000", "ok",
                                "-"]
    assert lines[4].split()[-2:] == ["excluded", "52"]
    assert lines[-1].startswith("excluded: 5Cheat22.. until round 52")


def test_missing_state_is_one_line_and_creates_nothing(tmp_path, capsys):
    path = tmp_path / "none.sqlite"
    assert main(["validator", "status", "--state", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no validator state at" in err[0] and not path.exists()


def test_the_validator_command_itself_still_parses(tmp_path):
    from niche.cli import build_parser

    args = build_parser().parse_args(["validator", "--netuid", "4"])
    assert args.netuid == 4 and args.validator_command is None


def test_without_state_it_finds_the_one_keyed_file_or_says_which(tmp_path, monkeypatch, capsys):
    from niche.validator.state import default_state_path

    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["validator", "status", "--json"]) == 2
    assert "no validator state file under" in capsys.readouterr().err
    first = default_state_path("finney", 23, "5Hot1").expanduser()
    first.parent.mkdir(parents=True)
    _state(first)
    assert main(["validator", "status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rounds_completed"] == 2
    second = default_state_path("test", 5, "5Hot2").expanduser()
    second.parent.mkdir(parents=True)
    _state(second)
    assert main(["validator", "status", "--json"]) == 2
    err = capsys.readouterr().err
    assert "2 validator state files" in err and str(first) in err and "--state" in err


def test_the_gateway_reads_the_validators_keyed_state_by_default(tmp_path, monkeypatch):
    from niche.cli import build_parser
    from niche.commands.gateway import _validator_state
    from niche.validator.state import default_state_path

    monkeypatch.setenv("HOME", str(tmp_path))
    args = build_parser().parse_args(["gateway", "serve", "--netuid", "23"])
    assert _validator_state(args, "finney", "5Hot1") == \
        default_state_path("finney", 23, "5Hot1").expanduser()
    args = build_parser().parse_args(["gateway", "serve", "--netuid", "23",
                                      "--gateway.validator_state", str(tmp_path / "s.db")])
    assert _validator_state(args, "finney", "5Hot1") == tmp_path / "s.db"
