"""An answer this validator can never audit is never paid.

A miner declares the dtype and kernels its networks ran in (`StatesCommitment`); an answer
declared in a dtype the validator holds no engine for, or with kernels it does not run, can
never be recomputed. Were only the audited ones unpaid, a miner declaring so would be paid
in full whenever its answer is not drawn for audit (`--neuron.audit_fraction` below 1) and
for every organic answer of users, while computing anything. So the declaration is checked
on every answer, before any draw, and on every organic answer the validator audits; a
backend the validator accepted but cannot run for the recomputation is the miner's choice,
not the validator's failure (which would freeze the miner's score)."""
from __future__ import annotations

import asyncio
import uuid

import pytest
import torch
from gateway_support import NETUID as GATEWAY_NETUID
from gateway_support import make_chain
from miner_support import announced_miners
from PIL import Image
from pydantic import ValidationError

from niche.chain.local import LocalChain
from niche.chain.wallets import create_wallet
from niche.imaging import encode_b64
from niche.miner.service import MinerConfig
from niche.protocol import GenerateRequest, GenerateResponse, GenerationParams, StatesCommitment
from niche.validator import scoring
from niche.validator.audit import Auditor, AuditResult
from niche.validator.challenges import Challenge
from niche.validator.client import MinerClient, MinerTarget, QueryResult, QueryStatus
from niche.validator.organic import OrganicQueue
from niche.validator.scoring import ScoringConfig
from niche.validator.service import Validator, ValidatorConfig
from niche.validator.state import ValidatorState
from niche.validator.steps import StepChecker
from niche.validator.verify import Verifier

NETUID = 1


class Declares:
    """A miner's engine that computes flux-schnell in float32 (as the validator does) and
    declares another dtype or other kernels: what a cheat that read the code would send."""

    def __init__(self, engine, dtype: str | None = None, kernels: dict | None = None):
        self._engine, self._dtype, self._kernels = engine, dtype, kernels

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def served(self):
        return [m for m in self._engine.served() if m.model == "flux-schnell"]

    def compute_dtype(self, model: str) -> str:
        return self._dtype or self._engine.compute_dtype(model)

    def kernels(self, model: str) -> dict:
        return self._kernels if self._kernels is not None else self._engine.kernels(model)

    def generate_with_states(self, params, image=None):
        return self._engine.generate_with_states(params, image)


@pytest.fixture
def net(tmp_path_factory):
    root = tmp_path_factory.mktemp("declared")
    names = ("validator", "honest", "bf16", "gguf")
    wallets = {n: create_wallet(n, "hot", root / "wallets") for n in names}
    chain = LocalChain(root / "chain.db", create=True)
    chain.create_subnet(NETUID, weights_rate_limit=2, max_validators=4)
    chain.register(NETUID, wallets["validator"], stake=100.0)
    uids = {n: chain.register(NETUID, wallets[n]) for n in names[1:]}
    yield chain, wallets, uids
    chain.close()


def test_an_unreproducible_declaration_earns_nothing_even_when_no_answer_is_audited(
        net, tiny_engine, tmp_path):
    chain, wallets, uids = net
    engines = {"honest": Declares(tiny_engine),
               "bf16": Declares(tiny_engine, dtype="bfloat16"),  # the validator holds float32
               "gguf": Declares(tiny_engine, kernels={"weights": "gguf-q8"})}
    config = ValidatorConfig(netuid=NETUID, models=("flux-schnell",), rounds=1,
                             state_path=tmp_path / "state.db", audit_fraction=0.0, seed=3,
                             epoch_length=1000, round_interval=0, info_timeout=5.0,
                             scoring=ScoringConfig(model_shares={"flux-schnell": 1.0}))
    miner_config = MinerConfig(netuid=NETUID, requests_per_minute=0)
    with ValidatorState(config.state_path) as state, announced_miners(
            chain, {n: (e, wallets[n], miner_config) for n, e in engines.items()}):
        validator = Validator(config, chain, wallets["validator"], tiny_engine,
                              MinerClient(wallets["validator"]), state)
        assert validator.run() == 0
    (report,) = validator.reports
    by_uid = {o.uid: o for o in report.outcomes}
    honest = by_uid[uids["honest"]]
    assert honest.status == "ok" and not honest.audited  # nothing drawn at fraction 0
    assert report.rewards[honest.uid] > 0
    for name, said in (("bf16", "declared dtype bfloat16"), ("gguf", "weights=gguf-q8")):
        outcome = by_uid[uids[name]]
        assert outcome.status == scoring.UNVERIFIABLE, validator.format_report(report)
        assert said in outcome.reason and outcome.audit_passed is None  # no caught cheat
        assert report.rewards[outcome.uid] == 0.0
        assert validator.book.scores()[outcome.uid] < validator.book.scores()[honest.uid]


def test_an_organic_answer_declared_unreproducible_costs_as_an_unavailable_one(
        tmp_path, tiny_engine):
    net = make_chain(tmp_path, miners=1)
    queue_path = tmp_path / "organic.sqlite"
    miner, uid = net.wallets["miner1"].hotkey.ss58_address, net.uids["miner1"]
    request_id = uuid.uuid4().hex  # as the gateway's router makes them
    image, sha = encode_b64(Image.new("RGB", (64, 64), (9, 9, 9)))  # any cheap image
    answer = GenerateResponse(
        request_id=request_id, model="flux-schnell", image=image, image_sha256=sha,
        miner_hotkey=miner, signature="00", generation_seconds=0.01, miner_version="x",
        states=StatesCommitment(shape=[1, 16, 64], sha256=["ab" * 32] * 4,
                                compute_dtype="bfloat16"))  # the validator holds float32
    request = GenerateRequest(request_id=request_id, params=GenerationParams(
        model="flux-schnell", prompt="x", seed=1, steps=4, width=64, height=64))
    queue = OrganicQueue(queue_path, signer=net.validator.hotkey.ss58_address)
    queue.submit(MinerTarget(uid, miner, "http://127.0.0.1:1"), request, answer, 0.1)
    config = ValidatorConfig(netuid=GATEWAY_NETUID, models=("flux-schnell",),
                             state_path=tmp_path / "v.sqlite", organic_queue=queue_path,
                             scoring=ScoringConfig(model_shares={"flux-schnell": 1.0}))
    try:
        with ValidatorState(config.state_path) as state:
            validator = Validator(config, net.chain, net.validator, tiny_engine,
                                  MinerClient(net.validator), state)
            outcomes: dict = {}
            asyncio.run(validator._audit_organic(net.chain.metagraph(GATEWAY_NETUID),
                                                 outcomes))
    finally:
        net.chain.close()
    charged = outcomes[uid]
    assert charged.unavailable and "unverifiable" in charged.reason
    assert "declared dtype bfloat16" in charged.reason and charged.audit_passed is None


def _audited_under(tiny_engine, tmp_path, attention: str, error: Exception) -> AuditResult:
    """The Auditor's verdict when the recomputation raises `error` for an answer that
    declared `attention` (on its declared kernels; the same recomputation on the default
    backend, which the Auditor then tries, runs)."""
    auditor = Auditor(tiny_engine, Verifier(tiny_engine), StepChecker(tiny_engine),
                      MinerClient(create_wallet("v", "hot", tmp_path)))
    params = GenerationParams(model="flux-schnell", prompt="a cat", seed=1, steps=4,
                              width=64, height=64, guidance=0.0)
    commitment = StatesCommitment(shape=[1, 16, 64], sha256=["ab" * 32] * 4,
                                  compute_dtype="float32", kernels={"attention": attention})
    response = GenerateResponse(request_id="r" * 32, model="flux-schnell", image="",
                                image_sha256="0" * 64, miner_hotkey="5m", signature="00",
                                generation_seconds=0.1, miner_version="x", states=commitment)
    result = QueryResult(0, "5m", QueryStatus.OK, response=response,
                         image=Image.new("RGB", (64, 64)))

    def recompute(*_, kernels=None):
        if kernels is None:  # the answer's declared kernels
            raise error
        return AuditResult(True, 1.0, "ok")

    auditor._check = recompute  # type: ignore[method-assign]
    return asyncio.run(auditor._check_safely(Challenge(0, "5m", "r" * 32, params, 30.0),
                                             result, {}, [0]))


def test_a_declared_backend_that_fails_the_recomputation_is_unverifiable(tiny_engine,
                                                                         tmp_path):
    failed = _audited_under(tiny_engine, tmp_path, "flash",
                            RuntimeError("No available kernel. Aborting execution."))
    assert failed.verdict == "unverifiable"
    assert "declared attention backend flash" in failed.reason
    # the validator's own failures stay its own: out of memory, or a bug with the defaults
    oom = _audited_under(tiny_engine, tmp_path, "flash",
                         torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert oom.verdict == "unaudited"
    bug = _audited_under(tiny_engine, tmp_path, "default", RuntimeError("a validator bug"))
    assert bug.verdict == "unaudited"


def test_the_backend_probe_runs_in_the_declared_dtype(tiny_engine):
    checker = StepChecker(tiny_engine)
    problem = checker.unreproducible("flux-schnell", "float32", {"attention": "efficient"})
    assert problem and "in float32" in problem  # on this CPU: no efficient kernel
    assert checker.unreproducible("flux-schnell", "float32", {"attention": "math"}) is None


@pytest.mark.parametrize("kernels", [{"attention\n": "flash"}, {"weights": "gguf-q8\n"},
                                     {"a": "x\nforged line"}])
def test_kernel_names_are_whole_names(kernels):
    with pytest.raises(ValidationError, match="short lower-case name"):
        StatesCommitment(shape=[4], sha256=["0" * 64], compute_dtype="float32",
                         kernels=kernels)

