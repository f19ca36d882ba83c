"""Audits at the step counts the subnet runs: FLUX.1-dev 28 steps, Kolors 30 (tiny checkpoints
whose YAML carries the production schedule), real miners on 127.0.0.1, the real client and
Auditor. Before, from N = 11 up, an audit needed more states than one /v1/states request may
carry, the request failed to build and the whole round went unaudited."""
from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest
import yaml
from audit_support import PeakFetches

from niche.chain.local import LocalChain
from niche.chain.wallets import create_wallet
from niche.devnet.localnet.supervisor import free_port
from niche.devnet.servers import BackgroundServer
from niche.miner.server import create_app
from niche.miner.service import MinerConfig, MinerService
from niche.models.engine import Engine
from niche.protocol import MAX_STATES_PER_FETCH, GenerationParams, StatesRequest
from niche.validator.audit import random_steps_needed
from niche.validator.client import MinerClient, MinerTarget
from niche.validator.scoring import ScoringConfig
from niche.validator.service import Validator, ValidatorConfig
from niche.validator.state import ValidatorState

NETUID = 1
PRODUCTION_STEPS = {"flux-dev": 28, "kolors": 30}


def production_folder(tiny_root, model: str, steps: int, dest):
    """The tiny checkpoint with the production schedule in its YAML (components linked)."""
    dest.mkdir()
    for entry in (tiny_root / model).iterdir():
        if entry.name != "niche_model.yaml":
            os.symlink(entry, dest / entry.name)
    spec = yaml.safe_load((tiny_root / model / "niche_model.yaml").read_text())
    spec["defaults"]["steps"] = steps
    (dest / "niche_model.yaml").write_text(yaml.safe_dump(spec))
    return dest


@pytest.fixture(scope="module")
def production_engine(tiny_root, tmp_path_factory):
    """FLUX.1-dev (bfloat16) and Kolors txt2img (float16) at 28 and 30 steps: the dtypes and
    schedules miners serve in production."""
    base = tmp_path_factory.mktemp("production")
    paths = {m: production_folder(tiny_root, m, n, base / m) for m, n in PRODUCTION_STEPS.items()}
    return Engine(models=list(PRODUCTION_STEPS), model_paths=paths, dtype=None,
                  pipelines={"kolors": ["txt2img"]})


class Only:
    """A miner that serves one model of the engine (what its operator chose)."""

    def __init__(self, engine, model):
        self._engine, self._model = engine, model

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def served(self):
        return [m for m in self._engine.served() if m.model == self._model]


class OtherSeed(Only):
    """Cheats: another seed's chain, claimed for the asked seed (caught at step 0)."""

    def generate_with_states(self, params, image=None):
        return self._engine.generate_with_states(
            params.model_copy(update={"seed": params.seed + 1}), image)


class CountingClient(MinerClient):
    """The real client, counting the signed /v1/states requests and their sizes."""

    chunks: list[int]

    async def _fetch_chunk(self, http, t, request_id, commitment, chunk, *args):
        self.chunks.append(len(chunk))
        return await super()._fetch_chunk(http, t, request_id, commitment, chunk, *args)


def start_miner(chain, wallet, engine):
    service = MinerService(engine, wallet, MinerConfig(netuid=NETUID, requests_per_minute=0),
                           chain=chain)
    server = BackgroundServer(create_app(service, refresh_metagraph=False)).start()
    service.announce("127.0.0.1", server.port)
    return service, server


def one_miner_chain(tmp_path):
    """A local chain with a staked validator and one registered miner (their wallets)."""
    miner, validator = (create_wallet(n, "hot", tmp_path / "w") for n in ("miner", "validator"))
    chain = LocalChain(tmp_path / "chain.db", create=True)
    chain.create_subnet(NETUID)
    chain.register(NETUID, validator, stake=100.0)
    chain.register(NETUID, miner)
    return chain, miner, validator


def test_a_round_at_production_step_counts_audits_every_answer(production_engine, tmp_path,
                                                               monkeypatch):
    """The honest miners hash every state while their engine computes the next steps (as
    1024x1024 answers are: the tiny states are below StreamedHashes' threshold, so it is set
    to 0 here), and every audit of their answers still passes bit for bit."""
    from niche.states import StreamedHashes

    monkeypatch.setattr(StreamedHashes, "STREAM_BYTES", 0)
    names = ("validator", "dev", "kolors", "cheat")
    wallets = {n: create_wallet(n, "hot", tmp_path / "wallets") for n in names}
    chain = LocalChain(tmp_path / "chain.db", create=True)
    chain.create_subnet(NETUID, weights_rate_limit=2, max_validators=4)
    chain.register(NETUID, wallets["validator"], stake=100.0)
    uids = {n: chain.register(NETUID, wallets[n]) for n in names[1:]}
    engines = {"dev": Only(production_engine, "flux-dev"),
               "kolors": Only(production_engine, "kolors"),
               "cheat": OtherSeed(production_engine, "flux-dev")}
    running = [start_miner(chain, wallets[n], e) for n, e in engines.items()]
    client = CountingClient(wallets["validator"])
    client.chunks = []
    config = ValidatorConfig(netuid=NETUID, models=tuple(PRODUCTION_STEPS), rounds=1,
                             state_path=tmp_path / "state.db", audit_fraction=1.0, seed=3,
                             epoch_length=1000, round_interval=0,
                             scoring=ScoringConfig(model_shares={"flux-dev": 0.5,
                                                                 "kolors": 0.5}))
    state = ValidatorState(config.state_path)
    validator = Validator(config, chain, wallets["validator"], production_engine, client, state)
    try:
        assert validator.run() == 0
    finally:
        for service, server in running:
            server.stop()
            service.close()
        state.close()
        chain.close()
    report = validator.reports[0]
    table = validator.format_report(report)
    by_uid = {o.uid: o for o in report.outcomes}
    dev, kolors, cheat = (by_uid[uids[n]] for n in ("dev", "kolors", "cheat"))
    for honest, model in ((dev, "flux-dev"), (kolors, "kolors")):
        assert honest.model == model and honest.audited and honest.audit_passed, table
        assert honest.similarity == 1.0, table  # same dtype, same kernels: bit-exact steps
        assert report.rewards[honest.uid] > 0
    assert cheat.audited and cheat.audit_passed is False and "step 0" in cheat.reason, table
    # every audit fetched what its plan needs (x_k, x_k+1 per random step, and x_N), in
    # requests of at most MAX_STATES_PER_FETCH: 12-14 states at these step counts
    assert client.chunks and max(client.chunks) <= MAX_STATES_PER_FETCH
    assert sum(client.chunks) >= 3 * 2 * random_steps_needed(28), client.chunks
    assert len(client.chunks) >= 6  # two or more requests per answer


def test_states_beyond_one_request_are_fetched_in_bounded_requests(production_engine,
                                                                   tmp_path):
    """A Kolors answer at 30 steps: all 30 states in 4 signed requests, each checked against
    its hash; the protocol still refuses a single request for more than the bound."""
    chain, miner, validator = one_miner_chain(tmp_path)
    service, server = start_miner(chain, miner, production_engine)
    client = CountingClient(validator)
    client.chunks = []
    try:
        from niche.protocol import GenerateRequest

        params = GenerationParams(model="kolors", prompt="a red fox", seed=4)
        request = GenerateRequest(request_id="prodfetch01", params=params, timeout=120)
        target = MinerTarget(1, miner.hotkey.ss58_address, f"http://127.0.0.1:{server.port}")
        result = asyncio.run(client.query(target, request))
        assert result.ok, result.reason
        commitment = result.response.states
        assert len(commitment.sha256) == 30 and commitment.compute_dtype == "float16"
        assert commitment.kernels == {"attention": "default"}  # protocol 4 declares them
        fetch = asyncio.run(client.fetch_states(target, "prodfetch01", commitment,
                                                range(1, 31)))
        assert fetch.ok and sorted(fetch.states) == list(range(1, 31)), fetch.reason
        assert client.chunks == [8, 8, 8, 6]
    finally:
        server.stop()
        service.close()
        chain.close()
    with pytest.raises(ValueError):
        StatesRequest(request_id="prodfetch01", indices=list(range(1, 10)))


def test_an_unreachable_miner_is_unavailable_not_a_cheat(production_engine, tmp_path):
    """A miner gone between its answer and the audit: the fetch retries until its deadline
    and the verdict is 'unavailable' (a fault), while the other answers of the same audit
    are judged as usual."""

    from niche.validator.audit import AuditConfig, Auditor
    from niche.validator.challenges import Challenge
    from niche.validator.steps import StepChecker
    from niche.validator.verify import Verifier

    chain, miner, validator = one_miner_chain(tmp_path)
    service, server = start_miner(chain, miner, production_engine)
    client = MinerClient(validator)
    dead_port = free_port()
    try:
        from niche.protocol import GenerateRequest

        items = []
        for i, url in enumerate((f"http://127.0.0.1:{server.port}",
                                 f"http://127.0.0.1:{dead_port}")):
            params = production_engine.resolve(GenerationParams(
                model="flux-dev", prompt="a lighthouse", seed=10 + i))
            request = GenerateRequest(request_id=f"gone{i:07d}", params=params, timeout=120)
            live = MinerTarget(1, miner.hotkey.ss58_address,
                               f"http://127.0.0.1:{server.port}")
            result = asyncio.run(client.query(live, request))
            assert result.ok, result.reason
            challenge = Challenge(uid=1, hotkey=live.hotkey, request_id=request.request_id,
                                  params=params, timeout=120.0)
            items.append((challenge, result, MinerTarget(1, live.hotkey, url)))
        auditor = Auditor(production_engine, Verifier(production_engine),
                          StepChecker(production_engine), client,
                          AuditConfig(fetch_timeout=1.5))
        passed, gone = asyncio.run(auditor.audit(items, np.random.default_rng(0)))
    finally:
        server.stop()
        service.close()
        chain.close()
    assert passed.passed and passed.verdict == "passed", passed.reason
    assert gone.unavailable and not gone.passed and gone.verdict == "unavailable"
    assert "tries" in gone.reason, gone.reason


@pytest.mark.parametrize("model", list(PRODUCTION_STEPS))
def test_honest_kernel_variants_pass_every_step_at_production_n(production_engine, tiny_root,
                                                               tmp_path, model):
    """At 28 / 30 steps in the production dtype: another thread count and a declared math
    attention backend recompute bit-exactly, a fused batch of 2 too or well inside the bands.
    The same math chain declared as the default fails for FLUX.1-dev (that is why backends
    are declared); float16 Kolors' bands are wide enough to hold it (docs/step-check.md)."""
    from niche.devnet import step_cheats
    from niche.validator.steps import StepChecker

    folder = production_folder(tiny_root, model, PRODUCTION_STEPS[model], tmp_path / model)
    kw = {"models": [model], "model_paths": {model: folder}, "dtype": None,
          "pipelines": {"kolors": ["txt2img"]} if model == "kolors" else None}
    checker = StepChecker(production_engine)
    params = production_engine.resolve(GenerationParams(model=model, prompt="a red fox",
                                                        seed=5))
    dtype = production_engine.compute_dtype(model)
    steps = list(range(PRODUCTION_STEPS[model]))
    other = params.model_copy(update={"prompt": "a blue boat", "seed": 6})
    variants = {
        "2 threads": (Engine(**kw, num_threads=2).generate_with_states(params)[1], None),
        "fused batch": (production_engine.generate_batch_with_states(
            [(params, None), (other, None)], fuse=True)[0][1], None),
        "math declared": (Engine(**kw, attention="math").generate_with_states(params)[1],
                          {"attention": "math"}),
    }
    for name, (states, kernels) in variants.items():
        verdict = checker.check(params, None, step_cheats.as_chain(states), steps,
                                dtype=dtype, kernels=kernels)
        worst = max(verdict.errors[k] / verdict.thresholds[k] for k in verdict.errors)
        if name == "fused batch" and dtype != "float32":
            # a half-precision GEMM of batch 2 may take another kernel than batch 1 on CPUs
            # with AVX512-FP16 / AMX (Sapphire Rapids: up to 0.15 of Kolors' float16 thresholds,
            # at steps 25-29): an honest fused batch passes well inside them, bit-exact or not
            assert verdict.passed and worst <= 0.25, (name, worst, verdict.reason)
        else:
            assert verdict.passed and worst == 0.0, (name, worst, verdict.reason)
    math_states = variants["math declared"][0]
    undeclared = checker.check(params, None, step_cheats.as_chain(math_states), steps,
                               dtype=dtype, kernels={})
    assert undeclared.passed == (model == "kolors"), undeclared.reason


def test_a_dtype_the_validator_does_not_hold_is_unverifiable_without_a_fetch(
        production_engine, tiny_engine, tmp_path):
    """A float16 Kolors answer audited by a validator that recomputes Kolors in float32
    only: 'unverifiable', said before any state is fetched, with the flag that fixes it."""
    from niche.protocol import GenerateRequest
    from niche.validator.audit import Auditor
    from niche.validator.challenges import Challenge
    from niche.validator.steps import StepChecker
    from niche.validator.verify import Verifier

    chain, miner, validator = one_miner_chain(tmp_path)
    service, server = start_miner(chain, miner, production_engine)
    client = CountingClient(validator)
    client.chunks = []
    try:
        params = production_engine.resolve(GenerationParams(model="kolors", prompt="a fox",
                                                            seed=8))
        request = GenerateRequest(request_id="unverif01", params=params, timeout=120)
        target = MinerTarget(1, miner.hotkey.ss58_address, f"http://127.0.0.1:{server.port}")
        result = asyncio.run(client.query(target, request))
        assert result.ok, result.reason
        auditor = Auditor(tiny_engine, Verifier(tiny_engine), StepChecker(tiny_engine), client)
        challenge = Challenge(uid=1, hotkey=target.hotkey, request_id="unverif01",
                              params=params, timeout=120.0)
        verdict, = asyncio.run(auditor.audit([(challenge, result, target)],
                                             np.random.default_rng(0)))
    finally:
        server.stop()
        service.close()
        chain.close()
    assert verdict.verdict == "unverifiable" and not verdict.passed
    assert "--verify.dtypes float16" in verdict.reason
    assert client.chunks == []  # nothing fetched for an answer it cannot judge


def test_states_held_at_once_are_bounded_by_parallel_fetches(tiny_engine, tmp_path):
    """Many answers of one miner audited together: their states are fetched one after
    another (the miner's one budget; tests/test_audit_budget.py bounds several miners by
    `parallel_fetches`), and every one passes."""
    from niche.protocol import GenerateRequest
    from niche.validator.audit import AuditConfig, Auditor
    from niche.validator.challenges import Challenge
    from niche.validator.steps import StepChecker
    from niche.validator.verify import Verifier

    chain, miner, validator = one_miner_chain(tmp_path)
    service, server = start_miner(chain, miner, tiny_engine)
    client = PeakFetches(validator, delay=0.05)  # a network's latency
    try:
        target = MinerTarget(1, miner.hotkey.ss58_address, f"http://127.0.0.1:{server.port}")
        items = []
        for i in range(5):
            params = tiny_engine.resolve(GenerationParams(model="flux-schnell",
                                                          prompt="a red fox", seed=30 + i))
            request = GenerateRequest(request_id=f"bounded{i:04d}", params=params, timeout=60)
            result = asyncio.run(client.query(target, request))
            assert result.ok, result.reason
            items.append((Challenge(uid=1, hotkey=target.hotkey, request_id=request.request_id,
                                    params=params, timeout=60.0), result, target))
        auditor = Auditor(tiny_engine, Verifier(tiny_engine), StepChecker(tiny_engine), client,
                          AuditConfig(parallel_fetches=2))
        verdicts = asyncio.run(auditor.audit(items, np.random.default_rng(1)))
    finally:
        server.stop()
        service.close()
        chain.close()
    assert [v.verdict for v in verdicts] == ["passed"] * 5
    assert client.peak == 1
