"""The validator's own failures are never scored against miners.

A validator out of file descriptors charged every honest miner `unreachable` (reward 0) and
`states_unavailable` (the 5-round penalty); a validator whose clock was two hours off scored
every honest miner 0 each round as `http_error` with no warning. Real miner servers, real
signatures, real sockets; the descriptor shortage is a real RLIMIT_NOFILE in a child process."""
from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from gateway_support import NETUID, Only, make_chain, running_miners
from raw_miner import RawMiner

from niche.chain.wallets import create_wallet
from niche.clock_skew import ClockOffsets
from niche.validator.client import MinerClient
from niche.validator.own_faults import local_os_error, round_fault
from niche.validator.scoring import ScoringConfig
from niche.validator.service import Validator, ValidatorConfig
from niche.validator.state import ValidatorState

ROOT = Path(__file__).resolve().parents[1]


class _Refusing(RawMiner):
    def answer(self, conn) -> None:
        conn.sendall(b"HTTP/1.1 503 X\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")


OUT_OF_DESCRIPTORS = textwrap.dedent("""
    import asyncio, json, os, resource, sys
    from niche.chain.wallets import load_wallet
    from niche.protocol import StatesCommitment
    from niche.validator.client import MinerClient
    from tests.miner_support import make_request

    url, hotkey, wallet_root = sys.argv[1:4]
    client = MinerClient(load_wallet("v", "hot", wallet_root))
    commitment = StatesCommitment(shape=[1, 4, 8, 8], sha256=["0" * 64] * 4,
                                  compute_dtype="float32")
    target = (3, hotkey, url)

    async def ask() -> dict:
        query = await client.query(target, make_request("x", model="flux-schnell"))
        info = await client.info(url, hotkey, uid=3)
        fetch = await client.fetch_states(target, "req-00000001", commitment, [1],
                                          timeout=1.0, retry_delay=0.05)
        return {"query": [query.status.value, query.reason],
                "info": [info.status.value, info.reason],
                "fetch": [fetch.validator_error, fetch.unavailable, fetch.reason]}

    async def starved() -> dict:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        hogs = []
        try:
            while True:
                hogs.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass
        try:
            return await ask()
        finally:
            for fd in hogs:
                os.close(fd)

    normal = asyncio.run(ask())  # first: whatever the calls import is imported
    print(json.dumps({"starved": asyncio.run(starved()), "normal": normal}))
""")


def test_a_validator_out_of_descriptors_charges_no_miner(tmp_path):
    create_wallet("v", "hot", tmp_path)
    miner = create_wallet("m", "hot", tmp_path).hotkey.ss58_address
    with _Refusing() as raw:
        done = subprocess.run([sys.executable, "-c", OUT_OF_DESCRIPTORS, raw.url, miner,
                               str(tmp_path)], capture_output=True, text=True, timeout=120,
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.splitlines()[-1])
    starved, normal = seen["starved"], seen["normal"]
    assert starved["query"][0] == "validator_error" and "EMFILE" in starved["query"][1]
    assert starved["info"][0] == "validator_error"
    assert starved["fetch"][0] is True and "EMFILE" in starved["fetch"][2]  # unaudited
    # the control: the same calls with descriptors to spare reach the miner's 503
    assert normal["query"][0] == "http_error" and normal["info"][0] == "http_error"
    assert normal["fetch"][:2] == [False, True]


def test_only_this_machines_resources_are_its_own():
    own = OSError(errno.EMFILE, "Too many open files")
    wrapped = aiohttp.ClientConnectorError.__new__(aiohttp.ClientConnectorError)
    wrapped._os_error = own  # how aiohttp carries a connect's OSError
    assert local_os_error(wrapped) is own
    try:
        try:
            raise own
        except OSError as inner:
            raise RuntimeError("in a handler") from inner
    except RuntimeError as outer:
        assert local_os_error(outer) is own
    for theirs in (errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH,
                   errno.EADDRNOTAVAIL, errno.ETIMEDOUT):
        assert local_os_error(OSError(theirs, "x")) is None  # a peer can cause these
    assert local_os_error(MemoryError()) is None and local_os_error(None) is None


@pytest.mark.parametrize(("asked", "skipped"), [
    ([("unreachable", "")] * 3, True),
    ([("timeout", ""), ("unreachable", ""), ("validator_error", "")], True),
    ([("http_error", "stale_request")] * 3, True),
    ([("http_error", "stale_request"), ("unreachable", ""), ("timeout", "")], True),
    ([("unreachable", "")] * 2, False),  # too few to say
    ([("unreachable", "")] * 9 + [("ok", "")], False),  # one answered: the network works
    ([("unreachable", "")] * 9 + [("no_model", "")], False),
    ([("unreachable", "")] * 9 + [("http_error", "bad_signature")], False),
    ([("unreachable", "")] * 9 + [("invalid_image", "")], False),
])
def test_a_round_is_the_validators_fault_only_when_every_miner_points_here(asked, skipped):
    assert (round_fault(asked) is not None) is skipped


def _three_miners(tmp_path, tiny_engine, rounds: int) -> tuple:
    """A chain with three FLUX.1-schnell miners' engines and a validator config of
    `rounds` rounds auditing every answer."""
    net = make_chain(tmp_path, miners=3)
    engines = {f"miner{i}": Only(tiny_engine, "flux-schnell") for i in (1, 2, 3)}
    config = ValidatorConfig(netuid=NETUID, models=("flux-schnell",), rounds=rounds, seed=4,
                             state_path=tmp_path / "v.sqlite", round_interval=0,
                             audit_fraction=1.0,
                             scoring=ScoringConfig(model_shares={"flux-schnell": 1.0}))
    return net, engines, config


def test_a_validator_clock_two_hours_off_scores_nobody_and_says_why(tmp_path, tiny_engine,
                                                                     caplog):
    net, engines, config = _three_miners(tmp_path, tiny_engine, rounds=1)
    caplog.set_level(logging.INFO, logger="niche.validator")
    with running_miners(net, engines):
        with ValidatorState(config.state_path) as state:  # one round on a good clock
            honest = Validator(config, net.chain, net.validator, tiny_engine,
                               MinerClient(net.validator), state)
            assert honest.run() == 0
            before = honest.book.scores()
        assert all(before[uid] > 0 for uid in net.uids.values())
        skewed = MinerClient(net.validator)
        skewed.clock_offsets = ClockOffsets(clock=lambda: time.time_ns() + 7200 * 10**9)
        with ValidatorState(config.state_path) as state:
            start = state.round_index
            off = Validator(replace(config, rounds=3), net.chain, net.validator, tiny_engine,
                            skewed, state)
            assert off.run() == 0
            assert state.round_index == start + 3  # moved on: the next challenges are new
            assert all(row.round < start for row in state.history(limit=1000))
            assert state.load_book(config.scoring).scores() == before
    assert off.book.scores() == before  # nothing scored, nothing lost
    assert all(not r.outcomes and "not scored" in r.weights_message for r in off.reports)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                and "not scored" in r.getMessage()]
    assert len(warnings) == 1, warnings  # once, not every round
    assert "stale_request" in warnings[0] and "NTP" in warnings[0]
    net.chain.close()


class _FailingFor(ClockOffsets):
    """This machine failing while it signs for one miner (its clock source, its memory)."""

    def __init__(self, hotkey: str):
        super().__init__()
        self.hotkey = hotkey

    def nonce_ns(self, receiver: str) -> int:
        if receiver == self.hotkey:
            raise OSError(errno.ENOMEM, "Cannot allocate memory")
        return super().nonce_ns(receiver)


def test_a_miner_this_validator_failed_to_ask_is_not_scored(tmp_path, tiny_engine):
    net, engines, config = _three_miners(tmp_path, tiny_engine, rounds=2)
    client = MinerClient(net.validator)
    unlucky = net.wallets["miner2"].hotkey.ss58_address
    client.clock_offsets = _FailingFor(unlucky)
    with running_miners(net, engines), ValidatorState(config.state_path) as state:
        validator = Validator(config, net.chain, net.validator, tiny_engine, client, state)
        assert validator.run() == 0
        rows = state.history(limit=1000)
    assert {row.uid for row in rows} == {net.uids["miner1"], net.uids["miner3"]}
    assert all(row.status == "ok" for row in rows)
    assert validator.book.scores().get(net.uids["miner2"], 0.0) == 0.0  # never charged
    assert all(r.outcomes and "not scored" not in r.weights_message for r in validator.reports)
    net.chain.close()


def test_a_node_raises_its_open_file_limit_to_the_hard_one():
    """Under a shell's `ulimit -Sn 256`, every long-running command starts with the hard
    limit as its soft one (run_exiting_cleanly_on_sigterm)."""
    script = ("import resource; from niche.commands.startup import raise_open_file_limit; "
              "print(raise_open_file_limit(), resource.getrlimit(resource.RLIMIT_NOFILE))")
    done = subprocess.run(["bash", "-c", f'ulimit -Sn 256 && "{sys.executable}" -c "{script}"'],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == 256:
        pytest.skip("the hard limit is 256 here: nothing to raise")
    wanted = 65536 if hard == resource.RLIM_INFINITY else hard
    assert done.stdout.split(")", 1)[0] == f"(256, {wanted}"
    assert done.stdout.strip().endswith(f"({wanted}, {hard})")
