"""The localnet supervisor: children in their own groups, deaths reported, nothing orphaned."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from niche.devnet.localnet.supervisor import Child, ChildFailed, Supervisor, free_port


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); read its state.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_free_port_is_bindable_and_outside_what_the_kernel_hands_out():
    """The plan's ports are bound seconds later: one from the kernel's ephemeral range could
    be taken meanwhile by any outgoing connection or port-0 listener."""
    import socket

    from niche.devnet.localnet.supervisor import ephemeral_ports

    low, high = ephemeral_ports()
    ports = {free_port() for _ in range(20)}
    assert all(1024 <= port < low for port in ports) and len(ports) > 1
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
            assert sock.getsockname() == ("127.0.0.1", port)


def test_free_port_skips_ports_in_use_and_falls_back_to_the_os(monkeypatch, tmp_path):
    import random
    import socket

    from niche.devnet.localnet import supervisor

    with socket.socket() as held:
        held.bind(("127.0.0.1", free_port()))
        taken, other = held.getsockname()[1], free_port()
        picks = iter([taken, taken, other])
        monkeypatch.setattr(random.SystemRandom, "choice", lambda self, seq: next(picks))
        assert free_port() == other
    narrow = tmp_path / "ip_local_port_range"
    narrow.write_text("10500\t60999\n")  # too few ports below it: the OS picks
    monkeypatch.setattr(supervisor, "EPHEMERAL_RANGE_FILE", narrow)
    assert supervisor.ephemeral_ports() == (10500, 60999)
    assert 10500 <= free_port() <= 65535
    monkeypatch.setattr(supervisor, "EPHEMERAL_RANGE_FILE", tmp_path / "missing")
    assert supervisor.ephemeral_ports() == (32768, 60999)


def test_dead_child_is_named_with_its_log_and_the_rest_stop(tmp_path):
    sup = Supervisor(stop_timeout=5)
    sleeper = sup.start(Child("miner1", _python("import time; time.sleep(60)"),
                              tmp_path / "miner1.log"))
    sup.start(Child("miner2", _python("print('cuda out of memory'); raise SystemExit(7)"),
                    tmp_path / "miner2.log"))
    deadline = time.monotonic() + 20
    with pytest.raises(ChildFailed) as caught:
        while time.monotonic() < deadline:
            sup.check()
            time.sleep(0.1)
    assert caught.value.child.name == "miner2" and caught.value.code == 7
    assert "cuda out of memory" in str(caught.value)
    sup.stop_all()
    assert not _alive(sleeper.pid)


def test_expected_exit_zero_is_not_a_failure(tmp_path):
    with Supervisor(stop_timeout=5) as sup:
        done = sup.start(Child("validator1", _python("pass"), tmp_path / "v.log",
                               expected_to_exit=True))
        done.process.wait(timeout=20)
        sup.check()  # exit 0 of a child that is meant to finish: no error
        assert sup.running(only_expected_to_exit=True) == []


def test_stop_reaches_grandchildren(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    code = f"""
        import subprocess, sys, time
        p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
        open({str(pid_file)!r}, 'w').write(str(p.pid))
        time.sleep(60)
    """
    with Supervisor(stop_timeout=5) as sup:
        sup.start(Child("miner1", _python(code), tmp_path / "m.log"))
        deadline = time.monotonic() + 20
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline, "grandchild never started"
            time.sleep(0.1)
        grandchild = int(pid_file.read_text())
        assert _alive(grandchild)
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild)


def test_children_die_with_a_killed_parent(tmp_path):
    """localnet itself SIGKILLed: its children get SIGTERM from the kernel (no orphans)."""
    pid_file = tmp_path / "child.pid"
    parent = f"""
        import time
        from pathlib import Path
        from niche.devnet.localnet.supervisor import Child, Supervisor
        sup = Supervisor()
        c = sup.start(Child('miner1', ['sleep', '60'], Path({str(tmp_path / 'm.log')!r})))
        Path({str(pid_file)!r}).write_text(str(c.pid))
        time.sleep(60)
    """
    proc = subprocess.Popen(_python(parent))
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline, "child never started"
            time.sleep(0.1)
        child = int(pid_file.read_text())
        assert _alive(child)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child)
    finally:
        proc.kill()


class _InterruptedWhileStarting(Child):
    """A Ctrl-C that lands after the fork, before start() returns (as inside Popen while it
    waits for the exec): the one moment a child exists that the supervisor has not seen."""

    def start(self) -> None:
        super().start()
        signal.raise_signal(signal.SIGINT)
        assert self.process is not None  # more bytecode: where the interrupt would surface


@pytest.fixture
def ctrl_c_interrupts():
    """SIGINT raising KeyboardInterrupt, as in a terminal, whatever the suite inherited: a
    run started as a background job of a non-interactive shell (`cmd &`, nohup, some CI
    runners) starts every process with SIGINT ignored, and then a Ctrl-C is rightly dropped."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_while_a_child_starts_still_stops_that_child(tmp_path, ctrl_c_interrupts):
    sup = Supervisor(stop_timeout=5)
    child = _InterruptedWhileStarting("validator1", _python("import time; time.sleep(60)"),
                                      tmp_path / "v.log")
    with pytest.raises(KeyboardInterrupt):  # delivered once the child is registered
        sup.start(child)
        sup.stop_all()  # not interrupted: stop the sleeper before pytest.raises fails
    assert sup.children == [child] and child.pid and _alive(child.pid)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    sup.stop_all()
    assert not _alive(child.pid)


def test_an_ignored_ctrl_c_stays_ignored_while_a_child_starts(tmp_path):
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with Supervisor(stop_timeout=5) as sup:
            child = sup.start(_InterruptedWhileStarting(
                "miner1", _python("import time; time.sleep(60)"), tmp_path / "m.log"))
            assert sup.children == [child]
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert not _alive(child.pid)


def test_a_held_ctrl_c_reaches_a_custom_handler_before_start_returns(tmp_path):
    """The held signal is handed to the real handler in start()'s own frame, not re-raised
    for Python to run whenever it next checks (possibly inside a finalizer, where a
    KeyboardInterrupt is dropped)."""
    calls = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
    try:
        with Supervisor(stop_timeout=5) as sup:
            sup.start(_InterruptedWhileStarting(
                "miner1", _python("import time; time.sleep(60)"), tmp_path / "m.log"))
            assert calls == [signal.SIGINT]  # delivered once, already
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_children_do_not_inherit_the_held_signals(tmp_path):
    """Stop signals are blocked while a child is forked; the child must get them again, or
    stop_all's SIGTERM would wait for the SIGKILL."""
    with Supervisor(stop_timeout=5) as sup:
        child = sup.start(Child("miner1", _python("import time; time.sleep(60)"),
                                tmp_path / "m.log"))
        status = Path(f"/proc/{child.pid}/status").read_text()
        blocked = int(next(line.split()[1] for line in status.splitlines()
                           if line.startswith("SigBlk:")), 16)
        for sig in (signal.SIGINT, signal.SIGTERM):
            assert not blocked & (1 << (sig - 1)), status
