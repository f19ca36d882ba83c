"""One budget per miner: the gateway signs with the validator's hotkey, so users' requests
and the validator's challenges draw on the same per-hotkey rate at each miner. A burst of
users at twice the miners' advertised rate, during validator rounds, must leave every honest
miner verified and weighted (the gateway keeps to the share the challenges leave it), and
the users past that share get 429 with Retry-After, not 502.

Real pieces throughout: a LocalChain file, real miner servers with their rate limit on,
the validator's rounds with audits, the gateway app, the official openai client."""
from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from gateway_support import NETUID, Only, make_chain, running_gateway
from miner_support import announced_miners

from niche.gateway.service import GatewayConfig
from niche.miner.service import MinerConfig
from niche.validator.client import MinerClient
from niche.validator.scoring import ScoringConfig
from niche.validator.service import Validator, ValidatorConfig
from niche.validator.state import ValidatorState

RATE = 30.0  # each miner's advertised requests per minute, per caller hotkey
ROUND_INTERVAL = 4.0


def limited_miners(net, engines):
    config = MinerConfig(netuid=NETUID, requests_per_minute=RATE)
    return announced_miners(net.chain, {name: (engine, net.wallets[name], config)
                                        for name, engine in engines.items()})


@pytest.mark.slow
def test_a_user_burst_at_twice_the_rate_leaves_honest_miners_verified(tmp_path, tiny_engine,
                                                                       tiny_root):
    net = make_chain(tmp_path, miners=2)
    engines = {name: Only(tiny_engine, "flux-schnell") for name in ("miner1", "miner2")}
    state_path = tmp_path / "validator.sqlite"
    config = ValidatorConfig(netuid=NETUID, models=("flux-schnell",), rounds=5, seed=9,
                             state_path=state_path, audit_fraction=1.0, epoch_length=1,
                             round_interval=ROUND_INTERVAL, info_timeout=5.0,
                             scoring=ScoringConfig(model_shares={"flux-schnell": 1.0}))
    statuses: list[int] = []
    retry_after: list[str | None] = []
    stop = threading.Event()

    def burst(base_url: str, key: str) -> None:
        client = openai.OpenAI(api_key=key, base_url=base_url, max_retries=0)

        def one(seed: int) -> None:
            try:
                client.images.generate(model="flux-schnell", prompt="a burst of users",
                                       size="64x64", extra_body={"seed": seed})
                statuses.append(200)
            except openai.APIStatusError as exc:
                statuses.append(exc.status_code)
                retry_after.append(exc.response.headers.get("retry-after"))

        with ThreadPoolExecutor(8) as pool:
            interval = 60.0 / (2 * 2 * RATE)  # twice the two miners' advertised rate
            seed = 0
            while not stop.is_set():
                pool.submit(one, seed)
                seed += 1
                stop.wait(interval)

    with limited_miners(net, engines), running_gateway(
            net, tiny_root, models=("flux-schnell",), validator_state=state_path,
            config=GatewayConfig(audit_fraction=0.0, refresh_interval=1.0)) as gw, \
            ValidatorState(state_path) as state:
        validator = Validator(config, net.chain, net.validator, tiny_engine,
                              MinerClient(net.validator), state)
        users = threading.Thread(target=lambda: (
            _wait_rounds(state_path, 2), time.sleep(1.5), burst(gw.base_url, gw.key)))
        users.start()
        try:
            assert validator.run() == 0
        finally:
            stop.set()
            users.join(timeout=60)
    reports = validator.reports
    for report in reports:
        table = validator.format_report(report)
        for name in ("miner1", "miner2"):
            outcome = {o.uid: o for o in report.outcomes}[net.uids[name]]
            assert outcome.status == "ok" and outcome.audit_passed, table
    # Weights are rate-limited by blocks, so the last round may only say "next weights in N
    # blocks": judge the last weights set once the burst had begun (round 2 on).
    weighted = [report for report in reports if report.weights and report.round >= 2]
    assert weighted, [report.weights_message for report in reports]
    last = weighted[-1]
    assert all(last.weights.get(net.uids[n], 0) > 0
               for n in ("miner1", "miner2")), last.weights_message
    assert 200 in statuses and 429 in statuses, statuses
    assert set(statuses) <= {200, 429}, statuses  # saturation is 429, never 502
    assert all(value and int(value) >= 1 for value in retry_after), retry_after
    net.chain.close()


def _wait_rounds(state_path, rounds: int, timeout: float = 120.0) -> None:
    import sqlite3

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(sqlite3.Error):
            with sqlite3.connect(f"file:{state_path}?mode=ro", uri=True) as db:
                row = db.execute("SELECT value FROM meta WHERE key='round'").fetchone()
                if row and int(row[0]) >= rounds:
                    return
        time.sleep(0.2)


def test_the_gateway_share_leaves_the_challenges_theirs():
    from niche.gateway.directory import inflight_share, organic_rate
    from niche.protocol import InfoResponse

    def info(**kw) -> InfoResponse:
        return InfoResponse(hotkey="5m", models=[], capacity_per_minute=0.0,
                            miner_version="t", **kw)

    # 60/min, 5 rounds a minute, one challenge each: 0.9 x 60 - 5
    assert organic_rate(info(requests_per_minute=60.0), 1.0, 5.0) == pytest.approx(49.0)
    # four replicas: four challenges a round
    assert organic_rate(info(requests_per_minute=60.0, concurrency=4), 1.0, 5.0) == \
        pytest.approx(34.0)
    # shared by stake: our half of 120/min
    assert organic_rate(info(requests_per_minute=120.0, stake_proportional=True), 0.5,
                        5.0) == pytest.approx(49.0)
    assert organic_rate(info(requests_per_minute=0.0), 1.0, 5.0) is None  # no limit
    assert organic_rate(info(), 1.0, 5.0) == pytest.approx(49.0)  # older miner: 60 assumed
    assert organic_rate(info(requests_per_minute=6.0), 1.0, 30.0) == 0.0  # nothing left
    # in flight: its concurrency, within the 8 per address less a round's challenges
    assert [inflight_share(c) for c in (1, 2, 4, 8, 16)] == [1, 2, 4, 4, 4]
    # at once: the miner's bucket (rate / 6, with our margin) less a round's challenges, so
    # the validator's round and the gateway's burst fit in it together
    from niche.gateway.directory import organic_burst

    assert organic_burst(info(requests_per_minute=60.0, concurrency=2), 1.0) == \
        pytest.approx(0.9 * 10 - 2)
    assert organic_burst(info(requests_per_minute=6.0, concurrency=4), 1.0) == 1.0
    assert organic_burst(info(requests_per_minute=0.0), 1.0) == float("inf")


def test_a_model_without_budget_left_is_429_with_retry_after(tmp_path):
    import asyncio

    from niche.chain.wallets import create_wallet
    from niche.gateway.directory import Candidate, MinerDirectory
    from niche.gateway.errors import GatewayError
    from niche.gateway.metrics import GatewayMetrics
    from niche.gateway.router import Router
    from niche.protocol import GenerationParams
    from niche.validator.client import MinerTarget

    wallet = create_wallet("gw", "hot", tmp_path / "wallets")
    client = MinerClient(wallet)
    directory = MinerDirectory(None, NETUID, client, own_hotkey="5gw")  # type: ignore[arg-type]
    spent = Candidate(MinerTarget(1, "5a", "http://127.0.0.1:9"), frozenset({"flux-schnell"}),
                      1.0, concurrency=1, rate=6.0)
    none_left = Candidate(MinerTarget(2, "5b", "http://127.0.0.1:9"),
                          frozenset({"flux-schnell"}), 1.0, concurrency=1, rate=0.0)
    directory.candidates = [spent, none_left]
    router = Router(directory, client, GatewayMetrics())
    router._take(spent)  # its one token (6/min: a bucket of 1) is in use
    params = GenerationParams(model="flux-schnell", prompt="x", seed=1, steps=4, width=64,
                              height=64)
    with pytest.raises(GatewayError) as caught:
        asyncio.run(router.generate(params, None, time.monotonic() + 30))
    error = caught.value
    assert error.status == 429 and error.code == "capacity_exhausted"
    assert error.headers["Retry-After"] == "10"  # one token at 6/min
    assert error.headers["x-niche-capacity-remaining-requests"] == "0"


def test_n_images_from_a_one_miner_model_queue_for_its_slot(tmp_path, tiny_engine, tiny_root):
    """A user's n=3 on a model one miner (concurrency 1) serves waits for the miner's slot
    within the deadline: three images, not 429 for the second and third."""
    from gateway_support import running_miners

    net = make_chain(tmp_path, miners=1)
    with running_miners(net, {"miner1": Only(tiny_engine, "flux-schnell")}), \
            running_gateway(net, tiny_root, models=("flux-schnell",),
                            config=GatewayConfig(audit_fraction=0.0)) as gw:
        client = openai.OpenAI(api_key=gw.key, base_url=gw.base_url, max_retries=0)
        images = client.images.generate(model="flux-schnell", prompt="three red circles",
                                        n=3, size="64x64", response_format="b64_json")
    assert len(images.data) == 3 and len({i.b64_json for i in images.data}) == 3
    net.chain.close()


@pytest.mark.parametrize(("interval", "per_minute"), [
    (4.0, 15.0),  # faster than the default guess: the challenges' share grows
    (12.0, 5.0), (60.0, 5.0),  # the default 12 s, or slower: the conservative 5 stays
    (0.0, 5.0)])  # back to back: unknown until rounds are on file
def test_the_gateway_leaves_the_configured_round_rate_before_rounds_are_on_file(
        tmp_path, interval, per_minute):
    """Before two rounds are in the state file, the gateway planned for 5 rounds a minute
    whatever the validator ran: at 4 s rounds users took the challenges' share of a miner's
    60/min and honest challenges got 429 (scored as errors)."""
    from niche.gateway.directory import read_validator_state

    path = tmp_path / "state.db"
    with ValidatorState(path) as state:
        state.record_round_interval(interval)
    assert read_validator_state(path).rounds_per_minute == pytest.approx(per_minute)


def test_a_validator_records_its_round_interval_at_start(tmp_path, tiny_engine):
    from niche.gateway.directory import read_validator_state

    net = make_chain(tmp_path, miners=1)
    config = ValidatorConfig(netuid=NETUID, models=("flux-schnell",), round_interval=3.0,
                             state_path=tmp_path / "v.sqlite")
    with ValidatorState(config.state_path) as state:
        Validator(config, net.chain, net.validator, tiny_engine, MinerClient(net.validator),
                  state)
    net.chain.close()
    assert read_validator_state(config.state_path).rounds_per_minute == pytest.approx(20.0)


def test_a_validator_refused_its_state_file_writes_nothing_there(tmp_path, tiny_engine):
    """Another validator's state file is refused before anything is written to it (its
    gateway would read this one's round interval as its own)."""
    import sqlite3

    from niche.validator.state import StateError

    net = make_chain(tmp_path, miners=1)
    path = tmp_path / "other.sqlite"
    with ValidatorState(path) as state:
        state.bind(net.chain.network, NETUID + 1, "5Other")
    config = ValidatorConfig(netuid=NETUID, models=("flux-schnell",), round_interval=3.0,
                             state_path=path)
    with ValidatorState(path) as state, pytest.raises(StateError):
        Validator(config, net.chain, net.validator, tiny_engine, MinerClient(net.validator),
                  state)
    net.chain.close()
    rows = sqlite3.connect(path).execute("SELECT key FROM meta").fetchall()
    assert ("round_interval",) not in rows
