"""Organic answers count: the gateway queues a share of what it delivers, the validator's
round audits them with the same step check as its challenges, and a miner caught cheating
users loses its score and is excluded, even when it answers every challenge honestly."""
from __future__ import annotations

import asyncio
import sqlite3

import openai
import pytest
from gateway_support import NETUID, Only, make_chain, running_gateway, running_miners
from PIL import Image

from niche.imaging import encode_b64
from niche.protocol import GenerateRequest, GenerateResponse, GenerationParams
from niche.validator.client import MinerClient, MinerTarget
from niche.validator.organic import OrganicQueue, QueueError
from niche.validator.scoring import ScoringConfig
from niche.validator.service import Validator, ValidatorConfig
from niche.validator.state import ValidatorState

SIGNER = "5validator"


class CheatsUsers(Only):
    """Honest on challenges; on what looks like user traffic (here: the word 'organic' in
    the prompt) it answers another seed's image and states, which is cheaper to serve from a
    cache. It still claims the requested seed, as a real cheat would."""

    def generate_with_states(self, params, image=None):
        if "organic" in params.prompt:
            params = params.model_copy(update={"seed": params.seed + 1})
        return self._engine.generate_with_states(params, image)


@pytest.mark.slow
def test_a_miner_cheating_users_is_caught_by_the_organic_audit(tmp_path, tiny_engine,
                                                               tiny_root):
    net = make_chain(tmp_path, miners=2)
    engines = {"miner1": CheatsUsers(tiny_engine, "flux-schnell"),
               "miner2": Only(tiny_engine, "flux-schnell")}
    state_path = tmp_path / "validator.sqlite"
    with running_miners(net, engines), \
            running_gateway(net, tiny_root, validator_state=state_path) as gw:
        client = openai.OpenAI(api_key=gw.key, base_url=gw.base_url, max_retries=0)
        served_by: dict[str, int] = {}
        for seed in range(12):  # until each miner served at least one user
            item = client.images.generate(model="flux-schnell", prompt="an organic apple",
                                          extra_body={"seed": seed}).data[0]
            served_by[item.miner_hotkey] = served_by.get(item.miner_hotkey, 0) + 1
            if len(served_by) == 2:
                break
        assert len(served_by) == 2, served_by
        queue = OrganicQueue(tmp_path / "organic.sqlite", signer=net.validator_hotkey)
        assert queue.counts()["pending"] == sum(served_by.values())

        config = ValidatorConfig(netuid=NETUID, models=("flux-schnell",), rounds=1,
                                 state_path=state_path, seed=3, round_interval=0,
                                 organic_queue=tmp_path / "organic.sqlite",
                                 scoring=ScoringConfig(model_shares={"flux-schnell": 1.0}))
        with ValidatorState(state_path) as state:
            validator = Validator(config, net.chain, net.validator, tiny_engine,
                                  MinerClient(net.validator), state)
            assert validator.run() == 0
            report = validator.reports[0]
        by_uid = {o.uid: o for o in report.outcomes}
        cheat, honest = by_uid[net.uids["miner1"]], by_uid[net.uids["miner2"]]
        print(validator.format_report(report))
        assert cheat.audit_passed is False and "organic audit_failed" in cheat.reason
        assert report.scores[cheat.uid] == 0.0 and report.rewards[cheat.uid] == 0.0
        assert validator.book.is_excluded(net.wallets["miner1"].hotkey.ss58_address, 1)
        assert honest.audit_passed is True and report.scores[honest.uid] > 0
        rows = dict(sqlite3.connect(tmp_path / "organic.sqlite").execute(
            "SELECT hotkey, group_concat(DISTINCT status) FROM organic GROUP BY hotkey"))
        assert rows == {net.wallets["miner1"].hotkey.ss58_address: "failed",
                        net.wallets["miner2"].hotkey.ss58_address: "passed"}

        # the gateway reads the exclusion from the validator's state and stops routing there
        asyncio.run(gw.gateway.directory.refresh())
        assert [c.target.uid for c in gw.gateway.directory.serving("flux-schnell")] == \
            [honest.uid]
    net.chain.close()


# ---------------------------------------------------------------------- the queue itself
def _answer(request_id: str) -> GenerateResponse:
    image, sha = encode_b64(Image.new("RGB", (64, 64), (9, 9, 9)))
    return GenerateResponse(request_id=request_id, model="flux-schnell", image=image,
                            image_sha256=sha, miner_hotkey="5miner", signature="00",
                            generation_seconds=0.1, miner_version="t")


def _request(request_id: str) -> GenerateRequest:
    return GenerateRequest(request_id=request_id, params=GenerationParams(
        model="flux-schnell", prompt="x", seed=1, steps=4, width=64, height=64))


def test_queue_claims_young_rows_once_skips_old_ones_and_stays_bounded(tmp_path):
    now = [1000.0]
    queue = OrganicQueue(tmp_path / "q.sqlite", signer=SIGNER, clock=lambda: now[0],
                         max_pending=3)
    target = MinerTarget(4, "5miner", "http://127.0.0.1:1")
    assert queue.submit(target, _request("old-request"), _answer("old-request"), 0.5)
    now[0] += 400
    for rid in ("young-one", "young-two"):
        assert queue.submit(target, _request(rid), _answer(rid), 0.5)
    assert not queue.submit(target, _request("over-cap"), _answer("over-cap"), 0.5)
    items = queue.claim(limit=1, max_age=300)
    assert [i.challenge.request_id for i in items] == ["young-one"]
    item = items[0]
    assert item.result.ok and item.result.image.size == (64, 64)
    assert item.target == target and item.challenge.params.steps == 4
    assert [i.challenge.request_id for i in queue.claim(10, 300)] == ["young-two"]
    assert queue.claim(10, 300) == []
    queue.record(item.id, True, "", 0.99)
    assert queue.counts() == {"skipped": 1, "passed": 1, "claimed": 1}
    now[0] += 10_000
    queue.prune(keep_seconds=60)
    assert queue.counts() == {"claimed": 1}  # unfinished rows are never pruned


def test_verdict_rows_drop_their_images_and_go_after_a_week(tmp_path):
    """At production sizes a row holds ~6 MiB of base64 (a 1024x1024 answer, a conditioning
    image): kept after its verdict, the queue grew by ~13 GiB a day."""
    from niche.validator.organic import VERDICTS_KEPT_SECONDS

    now = [1000.0]
    queue = OrganicQueue(tmp_path / "q.sqlite", signer=SIGNER, clock=lambda: now[0])
    target = MinerTarget(4, "5miner", "http://127.0.0.1:1")
    big = Image.effect_noise((1024, 1024), 64).convert("RGB")  # ~1 MiB of PNG
    image, sha = encode_b64(big)

    def submit(rid: str) -> None:
        request = _request(rid).model_copy(update={"image": image})
        answer = _answer(rid).model_copy(update={"image": image, "image_sha256": sha})
        assert queue.submit(target, request, answer, 0.5)

    submit("too-old-row")
    now[0] += 400
    submit("audited-row")
    (claimed,) = queue.claim(limit=1, max_age=300)  # and the first is skipped: too old
    assert claimed.challenge.request_id == "audited-row"
    queue.record(claimed.id, True, "", 0.99)
    now[0] += 100
    submit("waiting-row")
    db = sqlite3.connect(tmp_path / "q.sqlite")
    sizes = dict(db.execute("SELECT status, length(request) + length(response) FROM organic"))
    assert sizes["passed"] < 4096 and sizes["skipped"] < 4096  # verdicts: no images
    assert sizes["pending"] > 2 * len(image)  # still to audit: both images kept
    kept = GenerateResponse.model_validate_json(db.execute(
        "SELECT response FROM organic WHERE status='passed'").fetchone()[0])
    assert kept.request_id == "audited-row" and kept.image == "" and kept.image_sha256 == sha
    now[0] += VERDICTS_KEPT_SECONDS - 50
    assert queue.claim(limit=0, max_age=300) == []
    rows = list(db.execute("SELECT status, reason FROM organic"))
    assert rows == [("skipped", "too old to audit")]  # the week-old verdicts are gone


def test_unreadable_rows_are_skipped_with_a_reason(tmp_path):
    queue = OrganicQueue(tmp_path / "q.sqlite", signer=SIGNER)
    target = MinerTarget(1, "5miner", "http://127.0.0.1:1")
    queue.submit(target, _request("bad-image-1"), _answer("bad-image-1"), None)
    queue.submit(target, _request("bad-json-22"), _answer("bad-json-22"), None)
    db = sqlite3.connect(tmp_path / "q.sqlite")
    db.execute("UPDATE organic SET response = replace(response, '\"image\":\"', "
               "'\"image\":\"!!') WHERE request LIKE '%bad-image-1%'")
    db.execute("UPDATE organic SET request = '{' WHERE request LIKE '%bad-json-22%'")
    db.commit()
    assert queue.claim(10, 300) == []
    reasons = dict(db.execute("SELECT status, group_concat(reason, '|') FROM organic"
                              " GROUP BY status"))
    assert "unreadable image" in reasons["skipped"] and "unreadable queue row" in \
        reasons["skipped"]


def test_a_queue_that_cannot_be_opened_says_where(tmp_path):
    (tmp_path / "q.sqlite").mkdir()  # a folder where the file should be
    with pytest.raises(QueueError, match="q.sqlite"):
        OrganicQueue(tmp_path / "q.sqlite", signer=SIGNER)


def organic_config(tmp_path, queue_path) -> ValidatorConfig:
    """A flux-schnell validator reading the organic queue at `queue_path`."""
    return ValidatorConfig(netuid=NETUID, models=("flux-schnell",),
                           state_path=tmp_path / "v.sqlite", organic_queue=queue_path,
                           scoring=ScoringConfig(model_shares={"flux-schnell": 1.0}))


async def audit_and_record(validator: Validator, metagraph, outcomes: dict) -> None:
    """The round's organic audit and, as after the round is saved, its verdicts written."""
    await validator._audit_organic(metagraph, outcomes)
    await validator._record_organic()


def audit_queue_once(net, tmp_path, queue_path, engine) -> tuple[Validator, dict]:
    """A validator on `queue_path` audits its pending rows once: (validator, outcomes)."""
    config = organic_config(tmp_path, queue_path)
    with ValidatorState(config.state_path) as state:
        validator = Validator(config, net.chain, net.validator, engine,
                              MinerClient(net.validator), state)
        outcomes: dict = {}
        asyncio.run(audit_and_record(validator, net.chain.metagraph(NETUID), outcomes))
    return validator, outcomes


def test_rows_the_validator_cannot_audit_cost_no_miner_anything(tmp_path, tiny_engine):
    net = make_chain(tmp_path, miners=1)
    queue_path = tmp_path / "organic.sqlite"
    queue = OrganicQueue(queue_path, signer=net.validator_hotkey)
    miner = net.wallets["miner1"].hotkey.ss58_address
    uid = net.uids["miner1"]
    kolors = GenerateRequest(request_id="kolors-req", params=GenerationParams(
        model="kolors", prompt="x", seed=1, steps=2, width=64, height=64))
    queue.submit(MinerTarget(9, "5stranger", "http://127.0.0.1:1"), _request("gone-miner"),
                 _answer("gone-miner"), 0.1)
    queue.submit(MinerTarget(uid, miner, "http://127.0.0.1:1"), kolors, _answer("kolors-req"),
                 0.1)
    queue.submit(MinerTarget(uid, miner, "http://127.0.0.1:1"), _request("boom-request"),
                 _answer("boom-request"), 0.1)
    config = organic_config(tmp_path, queue_path)
    with ValidatorState(config.state_path) as state:
        validator = Validator(config, net.chain, net.validator, tiny_engine,
                              MinerClient(net.validator), state)

        async def broken(*_):
            raise MemoryError("validator out of memory")

        validator.auditor.audit = broken  # type: ignore[method-assign]
        outcomes: dict = {}
        asyncio.run(audit_and_record(validator, net.chain.metagraph(NETUID), outcomes))
    assert outcomes == {}
    reasons = [r[0] for r in sqlite3.connect(queue_path).execute(
        "SELECT reason FROM organic WHERE status='skipped' ORDER BY id")]
    assert reasons == ["miner no longer registered",
                       "model kolors is not served by this validator",
                       "validator error: MemoryError"]
    net.chain.close()


def test_an_organic_answer_whose_states_cannot_be_fetched_costs_like_a_challenge(
        tmp_path, tiny_engine):
    """Serving users, then making their audits' fetch fail, must not be free: the miner's
    round outcome becomes states_unavailable (zero, the EMA penalty), without exclusion."""
    from niche.protocol import StatesCommitment
    from niche.validator import scoring

    net = make_chain(tmp_path, miners=1)  # registered, no endpoint served: nothing answers
    queue_path = tmp_path / "organic.sqlite"
    queue = OrganicQueue(queue_path, signer=net.validator_hotkey)
    miner = net.wallets["miner1"].hotkey.ss58_address
    uid = net.uids["miner1"]
    answer = _answer("away-miner").model_copy(update={"states": StatesCommitment(
        shape=[1, 16, 64], sha256=["ab" * 32] * 4, compute_dtype="float32")})
    queue.submit(MinerTarget(uid, miner, "http://127.0.0.1:1"), _request("away-miner"),
                 answer, 0.1)
    _, outcomes = audit_queue_once(net, tmp_path, queue_path, tiny_engine)
    assert outcomes[uid].status == scoring.UNAVAILABLE and outcomes[uid].audit_passed is None
    assert "organic away-miner" in outcomes[uid].reason
    status, reason = sqlite3.connect(queue_path).execute(
        "SELECT status, reason FROM organic").fetchone()
    assert status == "skipped" and reason.startswith("unavailable")
    net.chain.close()
