"""An audit never starts a states fetch it cannot finish before the miner drops the states
(--states.ttl, 600 s by default, from about when the answer was given): an organic answer
queued minutes before its audit, reached late in a long audit, is `unaudited` (the
validator's slowness), not a 404 charged to an honest miner as unavailable (ten times over
for an organic answer)."""
from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from niche.validator.audit import AuditConfig, Auditor, FetchBudget
from niche.validator.client import MinerTarget, QueryResult, QueryStatus


class RecordingClient:
    """Says which answers' states were asked for (and sends none: the miner is gone)."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def fetch_states(self, target, request_id, *args, **kwargs):
        self.asked.append(request_id)
        return SimpleNamespace(validator_error=False, unavailable=True, refused=False,
                               cut_off=False, ok=False, reason="HTTP 404 (states not kept)")


class AnySteps:
    def unreproducible(self, *args):
        return ""


def _fetch(age: float | None):
    client = RecordingClient()
    auditor = Auditor(engine=None, verifier=None, steps=AnySteps(), client=client,
                      config=AuditConfig())
    challenge = SimpleNamespace(request_id="r1", params=SimpleNamespace(model="flux-schnell"))
    answered_at = None if age is None else time.time() - age
    result = QueryResult(1, "5miner", QueryStatus.OK, latency=1.0, request_id="r1",
                         answered_at=answered_at, image=object(), response=SimpleNamespace(
                             states=SimpleNamespace(compute_dtype="float32", kernels={},
                                                    sha256=["0" * 64] * 4)))
    verdict = asyncio.run(auditor._fetch_within(
        challenge, result, MinerTarget(1, "5miner", "http://127.0.0.1:9"), [0],
        FetchBudget(30.0), time.monotonic() + 540))
    return verdict, client.asked


@pytest.mark.parametrize("age", [566.0, 590.0, 900.0])
def test_an_answer_too_old_to_fetch_in_time_is_unaudited_and_not_asked(age):
    verdict, asked = _fetch(age)
    assert verdict.unaudited and not verdict.unavailable, verdict.reason
    assert "states keep time" in verdict.reason and asked == []


@pytest.mark.parametrize("age", [None, 0.0, 300.0, 560.0])
def test_an_answer_the_fetch_can_still_reach_is_fetched(age):
    verdict, asked = _fetch(age)
    assert asked == ["r1"] and verdict.unavailable  # fetched (the double's 404)


def test_a_queued_organic_answer_is_dated_when_it_was_queued(tmp_path):
    from test_audit_dodges import _answer, _request

    from niche.validator.organic import OrganicQueue

    now = [time.time() - 400.0]  # queued 400 s ago
    queue = OrganicQueue(tmp_path / "q.sqlite", signer="5ours", clock=lambda: now[0])
    queue.submit(MinerTarget(4, "5miner", "http://127.0.0.1:1"), _request("org-0001"),
                 _answer("org-0001"), 0.5)
    (item,) = queue.claim(10, 600)
    assert item.result.answered_at == now[0]
