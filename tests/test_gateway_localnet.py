"""The issue's "done when", as written: `niche localnet` prints a gateway URL and a key; the
official openai client gets two images from it; `niche verify` accepts each for the seed the
gateway reported."""
from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

NICHE = [str(Path(sys.executable).with_name("niche"))]


@pytest.mark.slow
def test_openai_client_against_localnet_and_niche_verify(tmp_path, tiny_root):
    env = dict(os.environ, NICHE_TINY_DIR=str(tiny_root), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(NICHE + ["localnet", "--miners", "2", "--models", "flux-schnell",
                                     "--workdir", str(tmp_path / "ln")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    seen = []
    try:
        deadline = time.monotonic() + 300
        match = None
        while match is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            match = re.search(r"gateway \(OpenAI images API\): (\S+)/v1 .*API key: (nk-\S+)",
                              line)
        assert match, "".join(seen)
        url, key = match.groups()
        # localnet names its gateway's key database and the command that adds a key there
        keys_line = proc.stdout.readline()
        seen.append(keys_line)
        where = re.search(r"gateway keys: (\S+); another key: (niche gateway keys create .*)$",
                          keys_line.strip())
        assert where and where.group(1) == str(tmp_path / "ln" / "gateway" / "gateway.sqlite"), \
            keys_line
        command = where.group(2).replace("NAME", "second").split() + ["--json"]
        made = subprocess.run(NICHE + command[1:], capture_output=True, text=True, env=env,
                              timeout=120)
        assert made.returncode == 0, made.stderr
        second = json.loads(made.stdout)["key"]
        listed = openai.OpenAI(api_key=second, base_url=f"{url}/v1", max_retries=0)
        assert [m.id for m in listed.models.list().data] == ["flux-schnell"]  # not a 401
        client = openai.OpenAI(api_key=key, base_url=f"{url}/v1", max_retries=0)
        answer = client.images.generate(model="flux-schnell", prompt="a red lighthouse", n=2,
                                        size="64x64", response_format="b64_json")
        assert len(answer.data) == 2
        for index, item in enumerate(answer.data):
            png = tmp_path / f"image{index}.png"
            png.write_bytes(base64.b64decode(item.b64_json))
            verdict = subprocess.run(
                NICHE + ["verify", "--tiny", "--model", "flux-schnell", "--prompt",
                         "a red lighthouse", "--seed", str(item.seed), "--width", "64",
                         "--height", "64", "--candidate", str(png)],
                capture_output=True, text=True, env=env, timeout=300)
            assert verdict.returncode == 0, verdict.stderr
            assert json.loads(verdict.stdout.strip().splitlines()[-1])["match"] is True
        # a wrong seed is not accepted: the check can fail
        wrong = subprocess.run(
            NICHE + ["verify", "--tiny", "--model", "flux-schnell", "--prompt",
                     "a red lighthouse", "--seed", str(answer.data[0].seed + 7), "--width",
                     "64", "--height", "64", "--candidate", str(tmp_path / "image0.png")],
            capture_output=True, text=True, env=env, timeout=300)
        assert wrong.returncode == 1, wrong.stderr  # a mismatch exits 1
        assert json.loads(wrong.stdout.strip().splitlines()[-1])["match"] is False
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, "".join(seen) + out
