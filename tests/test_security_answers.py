"""Cheating miners meet a real validator round: nothing a miner SAYS about its answer is
believed; everything scored is computed by the validator from the returned bytes and its own
clock, and every answer must carry the miner hotkey's signature over (request id, sha256 of
the image bytes).

The miners are small FastAPI apps on 127.0.0.1 (each with a real wallet, registered and
serving on a LocalChain file) that answer with a proper, seed-dependent 64x64 PNG and then
lie in exactly one way. The validator is the real one (client, checks, scoring, state) on
the tiny engine; audits are off here (audits are covered by test_validator_service.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import json

import numpy as np
import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image

from niche.auth import sign_response, verify_response
from niche.chain.local import LocalChain
from niche.chain.wallets import create_wallet
from niche.devnet.servers import BackgroundServer
from niche.imaging import encode_b64, image_sha256
from niche.protocol import InfoResponse, ModelInfo, PipelineKind
from niche.states import commit
from niche.validator.client import MinerClient
from niche.validator.service import Validator, ValidatorConfig
from niche.validator.state import ValidatorState

NETUID = 1
# How long the zero-seconds claimant really takes: well above what a starved 2-core box adds
# to the honest miner's instant answer, so "honest is faster" holds under load.
CLAIMANT_DELAY = 4.0
LIES = ("honest", "claims_zero_seconds", "wrong_sha256", "foreign_signature", "no_signature",
        "other_request_id", "signs_other_request")


def lying_miner(wallet, other_wallet, lie: str) -> FastAPI:
    app = FastAPI()
    hotkey = wallet.hotkey.ss58_address

    @app.get("/v1/info")
    async def info():
        return JSONResponse(InfoResponse(
            hotkey=hotkey, models=[ModelInfo(model="flux-schnell",
                                             pipelines=[PipelineKind.TXT2IMG])],
            capacity_per_minute=60, miner_version="x").model_dump(mode="json"))

    @app.post("/v1/generate")
    async def generate(request: Request):
        req = json.loads(await request.body())
        p, rid = req["params"], req["request_id"]
        rng = np.random.default_rng(p["seed"])  # a distinct, fixed image per challenge
        pixels = rng.integers(0, 256, (p.get("height") or 64, p.get("width") or 64, 3),
                              dtype=np.uint8)
        b64, digest = encode_b64(Image.fromarray(pixels, "RGB"))
        states = commit([torch.zeros((1, 4))] * int(p["steps"]), "float32")
        sd = states.digest()
        answer = dict(request_id=rid, model=p["model"], image=b64, image_sha256=digest,
                      miner_hotkey=hotkey, signature=sign_response(wallet.hotkey, rid, digest, sd),
                      generation_seconds=0.5, queue_seconds=0.0, miner_version="x",
                      states=states.model_dump(mode="json"))
        if lie == "claims_zero_seconds":
            await asyncio.sleep(CLAIMANT_DELAY)
            answer.update(generation_seconds=0.0, queue_seconds=0.0)
        elif lie == "wrong_sha256":  # consistent lie: signs the hash it claims
            fake = image_sha256(b"another image")
            answer.update(image_sha256=fake,
                          signature=sign_response(wallet.hotkey, rid, fake, sd))
        elif lie == "foreign_signature":
            answer["signature"] = sign_response(other_wallet.hotkey, rid, digest, sd)
        elif lie == "no_signature":
            answer["signature"] = ""
        elif lie == "other_request_id":
            answer["request_id"] = "replayed-answer-0001"
        elif lie == "signs_other_request":
            answer["signature"] = sign_response(wallet.hotkey, "replayed-answer-0001", digest,
                                                sd)
        return JSONResponse(answer)

    return app


@contextlib.contextmanager
def lying_network(root):
    wallets = {n: create_wallet(n, "hot", root / "wallets") for n in ("validator", *LIES)}
    outsider = create_wallet("outsider", "hot", root / "wallets")
    chain = LocalChain(root / "chain.db", create=True)
    chain.create_subnet(NETUID, max_validators=4)
    chain.register(NETUID, wallets["validator"], stake=100.0)
    uids = {lie: chain.register(NETUID, wallets[lie]) for lie in LIES}
    servers = []
    try:
        for lie in LIES:
            server = BackgroundServer(lying_miner(wallets[lie], outsider, lie)).start()
            servers.append(server)
            chain.serve(NETUID, wallets[lie], "127.0.0.1", server.port)
        yield chain, wallets, uids
    finally:
        for server in servers:
            server.stop()
        chain.close()


@pytest.fixture(scope="module")
def round_report(tmp_path_factory, tiny_engine):
    root = tmp_path_factory.mktemp("liars")
    with lying_network(root) as (chain, wallets, uids):
        wallet = wallets["validator"]
        config = ValidatorConfig(netuid=NETUID, models=("flux-schnell",), timeout=10.0,
                                 state_path=root / "state.db", audit_fraction=0.0, seed=9,
                                 epoch_length=10_000, round_interval=0)
        state = ValidatorState(config.state_path)
        validator = Validator(config, chain, wallet, tiny_engine, MinerClient(wallet), state)
        report = asyncio.run(validator.run_round())
        history = {row.uid: row for row in state.history(limit=100)}
        state.close()
    return report, uids, history, validator.format_report(report)


def test_claimed_timings_gain_nothing_latency_is_the_validators_clock(round_report):
    report, uids, _, table = round_report
    by_uid = {o.uid: o for o in report.outcomes}
    honest, claimant = by_uid[uids["honest"]], by_uid[uids["claims_zero_seconds"]]
    assert honest.status == "ok" and claimant.status == "ok", table
    assert claimant.latency >= CLAIMANT_DELAY, table  # it claimed 0 s; we timed the answer
    assert honest.latency < claimant.latency
    assert 0 < report.rewards[claimant.uid] < report.rewards[honest.uid], table


@pytest.mark.parametrize("lie, status", [
    ("wrong_sha256", "hash_mismatch"),
    ("foreign_signature", "bad_signature"),
    ("no_signature", "bad_signature"),
    ("other_request_id", "wrong_request_id"),
    ("signs_other_request", "bad_signature"),
])
def test_unbound_or_misdescribed_answers_are_rejected_and_earn_nothing(round_report, lie, status):
    report, uids, history, table = round_report
    outcome = next(o for o in report.outcomes if o.uid == uids[lie])
    assert outcome.status == status, table
    assert report.rewards[outcome.uid] == 0.0
    row = history[outcome.uid]  # the reason is kept for the operator
    assert row.status == status and row.reason and row.reward == 0.0


def test_response_signature_binds_image_request_and_miner(tmp_path):
    miner = create_wallet("m", "hot", tmp_path)
    other = create_wallet("o", "hot", tmp_path)
    image = b"\x89PNG fake bytes"
    digest = image_sha256(image)
    signature = sign_response(miner.hotkey, "request-000001", digest)
    assert verify_response(miner.hotkey.ss58_address, "request-000001", digest, signature)
    assert not verify_response(other.hotkey.ss58_address, "request-000001", digest, signature)
    assert not verify_response(miner.hotkey.ss58_address, "request-000002", digest, signature)
    assert not verify_response(miner.hotkey.ss58_address, "request-000001",
                               image_sha256(image + b"!"), signature)
