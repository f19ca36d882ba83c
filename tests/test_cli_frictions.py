"""Operator frictions of the command line, each run as a real `niche` process: a one-line
`error: ...` with advice and the right exit code (2: configuration, which pm2 holds), no
traceback, nothing created on disk before the arguments are known good; `niche verify`'s
exit code says whether the image matches; scripts/setup.sh replaces a CPU torch on request."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import torch
from cli_support import NICHE, ROOT, one_line_error

TINY_FLUX = ["--tiny", "--model", "flux-schnell", "--num-threads", "1", "--width", "64",
             "--height", "64"]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this box has a CUDA device")
HAS_PROC = pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")


def niche(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*NICHE, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, **kwargs)


# ------------------------------------------------------------------ 7: verify's exit code
@pytest.fixture(scope="module")
def flux_image(tmp_path_factory, tiny_root) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("verify")
    image, states = folder / "a.png", folder / "a.states"
    done = niche("generate", *TINY_FLUX, "--prompt", "a red fox", "--seed", "7", "--out",
                 str(image), "--states-out", str(states))
    assert done.returncode == 0, done.stderr
    return image, states


def test_verify_exits_1_on_a_mismatch_and_0_on_a_match(flux_image):
    image, states = flux_image
    common = ["verify", *TINY_FLUX, "--prompt", "a red fox", "--candidate", str(image)]
    match = niche(*common, "--seed", "7")
    assert match.returncode == 0, match.stderr
    assert json.loads(match.stdout.splitlines()[-1])["match"] is True
    forged = niche(*common, "--seed", "8")  # another seed's claim: a forged image
    assert forged.returncode == 1, forged.stderr
    assert json.loads(forged.stdout.splitlines()[-1])["match"] is False
    # the step check too
    stepped = niche(*common, "--seed", "7", "--states", str(states), "--check-steps", "all")
    assert stepped.returncode == 0, stepped.stderr
    other = niche("verify", *TINY_FLUX, "--prompt", "a blue square", "--candidate", str(image),
                  "--seed", "7", "--states", str(states), "--check-steps", "all")
    assert other.returncode == 1, other.stderr
    assert json.loads(other.stdout.splitlines()[-1])["match"] is False
    # a usage error stays 2
    assert "no such file" in one_line_error(niche(*common[:-1], str(image.with_name("no.png")),
                                                  "--seed", "7"))


def test_verify_help_states_the_exit_codes():
    text = " ".join(niche("verify", "--help").stdout.split())
    assert "0 the candidate matches, 1 it does not match, 2 a usage" in text


# ------------------------------------------------------------- 1: cuda on a CPU-only torch
@NO_CUDA
@pytest.mark.parametrize("command", [
    ["bench", "--model", "flux-schnell", "--device", "cuda"],
    ["bench", "--tiny", "--model", "flux-schnell", "--device", "cuda", "--runs", "1"],
    ["generate", *TINY_FLUX, "--prompt", "x", "--seed", "1", "--device", "cuda", "--out",
     "unused.png"],
], ids=["bench", "bench-tiny", "generate"])
def test_cuda_without_a_cuda_torch_is_one_line_with_the_fix(command, tmp_path):
    done = subprocess.run([*NICHE, *command], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    line = one_line_error(done)
    assert "device cuda requested" in line and "--device cpu" in line
    if torch.version.cuda is None:
        assert "CPU build" in line and "NICHE_TORCH=cuda bash scripts/setup.sh" in line
    assert not (tmp_path / "unused.png").exists()


# ------------------------------------------------------------------------ 3: bad paths
@pytest.fixture
def folder(tmp_path) -> Path:
    made = tmp_path / "folder"
    made.mkdir()
    return made


GENERATE = ["generate", "--model", "kolors", "--prompt", "x", "--seed", "1",
            # a model folder that does not exist: the output is refused before any loading
            "--model-path", "/nonexistent-niche-models"]


@pytest.mark.parametrize("case", ["out-folder", "states-folder", "missing-parent",
                                  "file-as-parent", "same-file"])
def test_generate_refuses_an_unwritable_output_before_generating(case, tmp_path, folder):
    out = tmp_path / "a.png"
    flags = {
        "out-folder": ["--out", str(folder)],
        "states-folder": ["--out", str(out), "--states-out", str(folder)],
        "missing-parent": ["--out", str(tmp_path / "missing" / "dir" / "x.png")],
        "file-as-parent": ["--out", str(Path(__file__) / "x.png")],
        "same-file": ["--out", str(out), "--states-out", str(out)],
    }[case]
    line = one_line_error(niche(*GENERATE, *flags))
    assert ("--out" in line or "--states-out" in line) and "model" not in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]  # nothing made
    assert not any(folder.iterdir())
    if case == "missing-parent":
        assert "mkdir -p" in line


@HAS_PROC
def test_generate_refuses_proc(tmp_path):
    assert "/proc" in one_line_error(niche(*GENERATE, "--out", "/proc/niche-x.png"))


@HAS_PROC
@pytest.mark.parametrize("target", ["file", "/proc/niche-tiny"])
def test_build_tiny_refuses_a_file_or_an_unwritable_folder(target, tmp_path):
    out = str(tmp_path / "file") if target == "file" else target
    if target == "file":
        Path(out).write_text("keep me")
    line = one_line_error(niche("models", "build-tiny", "--out", out))
    assert f"--out {out}" in line
    if target == "file":
        assert Path(out).read_text() == "keep me"


def test_localnet_refuses_a_file_as_workdir(tmp_path):
    workdir = tmp_path / "file"
    workdir.write_text("keep me")
    line = one_line_error(niche("localnet", "--workdir", str(workdir), "--rounds", "1"))
    assert "--workdir" in line and "not a folder" in line
    assert workdir.read_text() == "keep me"


@HAS_PROC
@pytest.mark.parametrize("neuron", ["miner", "validator"])
@pytest.mark.parametrize("target", ["file", "/proc/niche-logs"])
def test_neurons_refuse_a_logging_dir_they_cannot_write(neuron, target, tmp_path):
    where = str(tmp_path / "file") if target == "file" else target
    if target == "file":
        Path(where).write_text("keep me")
    line = one_line_error(niche(neuron, "--netuid", "1", "--subtensor.network", "localnet",
                                "--localnet.path", str(tmp_path / "chain.db"),
                                "--logging.logging_dir", where))
    assert f"--logging.logging_dir {where}" in line
    assert not (tmp_path / "chain.db").exists()


# ------------------------------------------------------------------- 4: gateway start-up
@pytest.fixture
def gateway_chain(tmp_path):
    from gateway_support import make_chain

    net = make_chain(tmp_path, miners=0)
    net.chain.close()
    return tmp_path


def _gateway(root: Path, port: int, *extra: str, netuid: str = "1",
             wallet: str = "validator") -> list[str]:
    return [*NICHE, "gateway", "serve", "--netuid", netuid, "--subtensor.network", "localnet",
            "--localnet.path", str(root / "chain.db"), "--wallet.name", wallet,
            "--wallet.hotkey", "hot", "--wallet.path", str(root / "wallets"),
            "--gateway.port", str(port), "--gateway.db", str(root / "gw.sqlite"),
            "--gateway.organic_queue", str(root / "q.sqlite"), "--models", "flux-schnell",
            *extra]


def test_gateway_configuration_errors_exit_2_naming_its_own_flags(gateway_chain, tiny_root):
    root = gateway_chain
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = _gateway(root, port, "--model-path", str(tiny_root))
        done = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT)
    line = one_line_error(done)
    assert "--gateway.port" in line and "--axon.port" not in line, line
    assert not (root / "gw.sqlite").exists()  # refused before the key database is made
    from niche.devnet.localnet.supervisor import free_port

    hotkey = subprocess.run(_gateway(root, free_port(), wallet="nobody"), capture_output=True,
                            text=True, timeout=300, cwd=ROOT)
    one_line_error(hotkey)
    subnet = subprocess.run(_gateway(root, free_port(), netuid="9"), capture_output=True,
                            text=True, timeout=300, cwd=ROOT)
    assert "subnet 9 does not exist" in one_line_error(subnet)


def test_gateway_logs_its_own_shutdown(gateway_chain, tiny_root):
    from niche.devnet.localnet.supervisor import free_port

    port = free_port()
    proc = subprocess.Popen(_gateway(gateway_chain, port, "--model-path", str(tiny_root)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "niche.gateway: SIGTERM received: stopping" in out, out
    assert "niche.miner" not in out, out


# ------------------------------------------------------------------------ 5: localnet
@pytest.mark.parametrize("flags, words", [
    (["--miners", "1", "--cheat", "fewer-steps", "--cheat", "other-seed"], "--miners 2"),
    (["--audit-fraction", "2"], "--audit-fraction must be in [0, 1]"),
    (["--rounds", "0"], "leave it out to run until Ctrl-C"),
    (["--miner1-args", "'--unbalanced"], "--miner1-args"),
], ids=["cheats", "audit-fraction", "rounds", "miner1-args-quotes"])
def test_localnet_refuses_bad_arguments_up_front(flags, words, tmp_path):
    workdir = tmp_path / "localnet"
    line = one_line_error(niche("localnet", "--workdir", str(workdir), *flags, timeout=60))
    assert words in line, line
    assert not workdir.exists()  # not even its lock


def test_localnet_help_shows_the_equals_form_of_miner1_args():
    text = " ".join(niche("localnet", "--help").stdout.split())
    assert "--miner1-args=--engine.fast" in text
    assert "(at least 1)" in text


# -------------------------------------------------------------------- 6: wrong advice
def test_a_model_dir_not_named_after_its_model_gets_a_working_download_command(tmp_path):
    where = tmp_path / "weights"
    line = one_line_error(niche("generate", "--model", "kolors", "--model-dir",
                                f"kolors={where}", "--prompt", "x", "--seed", "1", "--out",
                                str(tmp_path / "a.png"), "--device", "cpu"))
    assert f"--dest {where}`" in line and f"--model-dir kolors={where / 'kolors'}" in line
    assert "--dest /`" not in line and f"--dest {tmp_path}`" not in line


def test_keys_create_names_the_flag_that_is_wrong(tmp_path):
    db = tmp_path / "gw.sqlite"
    line = one_line_error(niche("gateway", "keys", "create", "--name", "x", "--per-day", "0",
                                "--gateway.db", str(db)))
    assert "--per-day" in line and "per_minute" not in line
    assert not db.exists()


def test_dashboard_busy_port_names_the_callers_flag(tmp_path):
    from niche.errors import NicheError
    from niche.validator.dashboard import start_dashboard

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(NicheError, match="--port"):
            start_dashboard(tmp_path / "state.sqlite", busy.getsockname()[1],
                            port_flag="--port")


# ------------------------------------------------------------ 2: setup.sh on a CPU set-up
FAKE_PYTHON = """#!/usr/bin/env bash
# stands in for .venv/bin/python: torch's build is in $FAKE_TORCH (none, cpu, cuda)
echo "python $*" >> "$FAKE_LOG"
if [ "$1" = "-m" ]; then exit 0; fi
case "$2" in
    *torch.version.cuda*) [ "$FAKE_TORCH" != none ] && echo "$FAKE_TORCH" && exit 0; exit 1 ;;
    *torch.__version__*) echo "2.13.0+$FAKE_TORCH" ;;
esac
exit 0
"""


def _setup_run(tmp_path: Path, torch_build: str, want: str | None, marker: str | None
               ) -> tuple[str, list[str]]:
    box = tmp_path / "box"
    (box / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup.sh", box / "scripts" / "setup.sh")
    (box / "constraints").mkdir()
    (box / "constraints" / "gpu.txt").write_text("torch==2.13.0\n")
    (box / "pyproject.toml").write_text("")
    for tool in (box / ".venv" / "bin" / "python", box / "node_modules" / ".bin" / "pm2"):
        tool.parent.mkdir(parents=True)
        tool.write_text(FAKE_PYTHON)
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    if marker is not None:
        (box / ".venv" / ".niche-installed").write_text(marker)
        os.utime(box / "pyproject.toml", (1, 1))  # older than the marker
    log = tmp_path / "log"
    log.write_text("")
    env = {k: v for k, v in os.environ.items() if k != "NICHE_TORCH"}
    env.update(FAKE_TORCH=torch_build, FAKE_LOG=str(log))
    if want is not None:
        env["NICHE_TORCH"] = want
    done = subprocess.run(["bash", str(box / "scripts" / "setup.sh")], capture_output=True,
                          text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    pip = [line for line in log.read_text().splitlines() if " -m pip " in line]
    return done.stdout, pip


def test_setup_with_cuda_replaces_a_cpu_torch_and_applies_the_pins(tmp_path):
    out, pip = _setup_run(tmp_path, "cpu", "cuda", marker="")  # an older CPU set-up
    assert "replacing the CPU build of torch (2.13.0+cpu)" in out, out
    assert any("uninstall" in call and "torch" in call for call in pip), pip
    assert any("install --quiet -c constraints/gpu.txt torch" in call for call in pip), pip
    assert any("-c constraints/gpu.txt -e .[dev,ray]" in call for call in pip), pip


@pytest.mark.parametrize("torch_build, want, marker, expected", [
    ("cpu", None, "", []),  # a CPU set-up run again: nothing to do
    ("cuda", None, "gpu", []),  # a GPU box's test.sh: CUDA torch is kept
    ("cuda", "cuda", "gpu", []),  # already done
    ("cuda", "cuda", "", ["-c constraints/gpu.txt -e .[dev,ray]"]),  # pins never applied
], ids=["cpu-again", "gpu-box-default", "gpu-again", "gpu-unpinned"])
def test_setup_decisions(tmp_path, torch_build, want, marker, expected):
    out, pip = _setup_run(tmp_path, torch_build, want, marker)
    assert not any("uninstall" in call for call in pip), pip
    assert len(pip) == len(expected), pip
    for call, words in zip(pip, expected, strict=True):
        assert words in call, pip
