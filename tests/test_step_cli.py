"""`niche generate --states-out` and `niche verify --states`: the step check by hand."""
from __future__ import annotations

import json

from niche.cli import main
from niche.models.spec import load_spec

REQUEST = ["--tiny", "--model", "kolors", "--seed", "7", "--num-threads", "1"]


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_generate_states_then_verify_them(tmp_path, capsys):
    image, states = tmp_path / "a.png", tmp_path / "a.states"
    assert main(["generate", *REQUEST, "--prompt", "a red circle", "--out", str(image),
                 "--states-out", str(states)]) == 0
    capsys.readouterr()
    verify = ["verify", *REQUEST, "--candidate", str(image), "--states", str(states),
              "--check-steps", "all"]
    assert main([*verify, "--prompt", "a red circle"]) == 0
    honest = _last_json(capsys)
    assert honest["match"] is True and honest["compute_dtype"] == load_spec("kolors").dtype
    assert sorted(honest["steps"], key=int) == [str(k) for k in range(8)]
    assert all(s["error"] == 0.0 for s in honest["steps"].values())  # same dtype, same bits
    # the same states claimed for another prompt: step 0 already disagrees
    assert main([*verify, "--prompt", "a blue square"]) == 1  # a mismatch exits 1
    cheat = _last_json(capsys)
    assert cheat["match"] is False and cheat["reason"].startswith("step 0")
    assert cheat["steps"]["0"]["error"] > 10 * cheat["steps"]["0"]["threshold"]
    # a random step choice: step 0 and one other
    assert main([*verify[:-2], "--prompt", "a red circle", "--check-seed", "3"]) == 0
    picked = _last_json(capsys)
    assert picked["match"] is True and len(picked["steps"]) == 2 and "0" in picked["steps"]


def test_bad_states_files_are_one_line_errors(tmp_path, capsys):
    image = tmp_path / "a.png"
    assert main(["generate", *REQUEST, "--prompt", "a cat", "--out", str(image)]) == 0
    junk = tmp_path / "junk.states"
    junk.write_bytes(b"not a safetensors file")
    for path, message in ((tmp_path / "missing.states", "no such file"),
                          (junk, "is not a states file")):
        capsys.readouterr()
        rc = main(["verify", *REQUEST, "--prompt", "a cat", "--candidate", str(image),
                   "--states", str(path)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and message in err[0], err
