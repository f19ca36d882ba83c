"""Stopping a local subnet (Ctrl-C, a dead child, the end of its rounds) stops the validators
and the gateway first and waits for them, so their last round never audits dead miners."""
from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

from niche.devnet.localnet.plan import ProcessPlan
from niche.devnet.localnet.run import _child
from niche.devnet.localnet.supervisor import Child, Supervisor

CHILD = textwrap.dedent("""
    import signal, sys, time
    name, journal, linger = sys.argv[1], sys.argv[2], float(sys.argv[3])

    def stop(*_):
        with open(journal, "a") as f:
            f.write(f"{name} got SIGTERM\\n")
        time.sleep(linger)  # a validator finishing its round
        with open(journal, "a") as f:
            f.write(f"{name} stopped\\n")
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    time.sleep(60)
""")


def _wait_ready(child: Child) -> None:
    deadline = time.monotonic() + 20
    while "ready" not in (child.log_path.read_text() if child.log_path.exists() else ""):
        assert time.monotonic() < deadline, f"{child.name} never ready"
        time.sleep(0.05)


def test_validators_stop_before_the_miners(tmp_path):
    journal = tmp_path / "journal"
    sup = Supervisor(stop_timeout=10)
    children = [sup.start(Child(name, [sys.executable, "-c", CHILD, name, str(journal), linger],
                                tmp_path / f"{name}.log", stage=stage))
                for name, linger, stage in (("miner1", "0", 0), ("miner2", "0", 0),
                                            ("validator1", "1.0", 1), ("gateway", "0.2", 1))]
    for child in children:
        _wait_ready(child)
    sup.stop_all()
    lines = journal.read_text().splitlines()
    first_miner = min(lines.index(f"miner{i} got SIGTERM") for i in (1, 2))
    assert lines.index("validator1 stopped") < first_miner, lines
    assert lines.index("gateway stopped") < first_miner, lines
    assert all(c.poll() == 0 for c in children)


def test_localnet_puts_validators_and_gateway_in_the_first_stage(tmp_path):
    stages = {role: _child(ProcessPlan(role, role, "h", "hk", ["--version"]), tmp_path).stage
              for role in ("miner", "validator", "gateway")}
    assert stages["validator"] > stages["miner"] and stages["gateway"] > stages["miner"]
    assert Path(_child(ProcessPlan("m", "miner", "h", "hk", []), tmp_path).log_path).name == \
        "m.log"
