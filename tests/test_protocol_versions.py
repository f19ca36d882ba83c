"""Rolling upgrades: a validator and miners one protocol version apart, side by side over
real HTTP on 127.0.0.1. A miner speaking only protocol 2 (what the previous release
speaks) and one speaking 2..3 answer the same validator (2..3): each negotiated through
/v1/info, each answer signed in its own version's message. Real miners (the HTTP layer
over StubEngine, then the real Engine on tiny checkpoints for a full validator round)."""
from __future__ import annotations

from niche.auth import verify_response
from niche.protocol import (
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    SUPPORTED_PROTOCOL_VERSIONS,
    InfoResponse,
    negotiate,
)
from niche.validator.client import MinerClient, QueryStatus
from tests.miner_support import (
    StubEngine,
    make_request,
    module_net,
    round_with_two_versions,
    running_miner,
)

OLD, NEW = MIN_PROTOCOL_VERSION, PROTOCOL_VERSION


def test_versions_are_one_apart():
    assert (OLD, NEW) == (2, 4) and SUPPORTED_PROTOCOL_VERSIONS == (2, 3, 4)
    assert negotiate([2], [2, 3]) == 2 and negotiate([2, 3], [2, 3]) == 3
    assert negotiate([3, 4], [2, 3]) == 3 and negotiate([4], [2, 3]) is None
    assert negotiate([3, 4], SUPPORTED_PROTOCOL_VERSIONS) == 4


def test_info_of_a_protocol_2_miner_and_of_a_newer_one_both_read():
    old = InfoResponse.model_validate({"protocol_version": 2, "hotkey": "5H", "models": [],
                                       "capacity_per_minute": 1.0, "miner_version": "0.1.0"})
    assert old.speaks() == [2]
    newer = InfoResponse.model_validate({
        "protocol_version": 4, "protocol_versions": [3, 4], "hotkey": "5H", "models": [],
        "capacity_per_minute": 1.0, "miner_version": "9.0", "torch": "3.1", "gpu": "X"})
    assert newer.speaks() == [3, 4]  # unknown fields ignored, not refused


net = module_net("versions")


async def _ask(client, miner, **request):
    info = await client.info(miner.url, miner.hotkey)
    result = await client.query((0, miner.hotkey, miner.url), make_request(**request))
    return info, result


def test_old_and_new_miner_side_by_side(net):
    import asyncio

    client = MinerClient(net.wallets["hi"])  # a validator speaking 2 and 3
    with running_miner(net, StubEngine(), protocol_versions=(OLD,)) as old, \
            running_miner(net, StubEngine(), protocol_versions=(OLD, NEW)) as new:
        old_info, old_answer = asyncio.run(_ask(client, old, seed=3))
        new_info, new_answer = asyncio.run(_ask(client, new, seed=4))
    assert old_info.ok and old_info.info.speaks() == [OLD] and old_info.protocol_version == OLD
    assert new_info.ok and new_info.info.speaks() == [OLD, NEW]
    assert new_info.protocol_version == NEW
    for answer, version, other in ((old_answer, OLD, NEW), (new_answer, NEW, OLD)):
        assert answer.status is QueryStatus.OK, answer.reason
        r = answer.response
        assert r.protocol_version == version
        # the signature names its version: valid in it, not in the other
        args = (answer.hotkey, r.request_id, r.image_sha256, r.signature, r.states_digest())
        assert verify_response(*args, version=version)
        assert not verify_response(*args, version=other)


def test_an_old_validator_asks_a_new_miner_in_protocol_2(net):
    import asyncio

    old_validator = MinerClient(net.wallets["hi"], protocol_versions=(OLD,))
    with running_miner(net, StubEngine()) as new:
        info, answer = asyncio.run(_ask(old_validator, new, seed=5))
    assert info.protocol_version == OLD
    assert answer.status is QueryStatus.OK and answer.response.protocol_version == OLD


def test_a_request_in_a_version_the_miner_does_not_speak_is_refused(net):
    import asyncio

    client = MinerClient(net.wallets["hi"])
    with running_miner(net, StubEngine(), protocol_versions=(OLD,)) as old:
        # without /v1/info first the client speaks its newest: the old miner refuses
        result = asyncio.run(client.query((0, old.hotkey, old.url), make_request(seed=6)))
    assert result.status is QueryStatus.HTTP_ERROR and result.http_status == 400
    assert "unsupported_protocol_version" in result.reason
    assert f"protocol 2, got {NEW}" in result.reason


def test_two_versions_apart_is_a_clear_mismatch(net):
    import asyncio

    client = MinerClient(net.wallets["hi"], protocol_versions=(OLD,))
    with running_miner(net, StubEngine(), protocol_versions=(NEW,)) as newest:
        info = asyncio.run(client.info(newest.url, newest.hotkey))
    assert info.status is QueryStatus.PROTOCOL_MISMATCH and info.protocol_version is None
    assert f"miner speaks protocol [{NEW}], this validator [2]" in info.reason


def test_a_validator_round_with_miners_one_version_apart(tmp_path, tiny_engine):
    """The whole round with a protocol-OLD miner and a protocol-OLD..NEW miner on the real
    tiny Engine: both verified and weighted, each asked in its own version."""
    run = round_with_two_versions(tmp_path, tiny_engine, {"old": (OLD,), "new": (OLD, NEW)},
                                  MinerClient, seed=11)
    assert run.client.version_for(run.hotkeys["old"]) == OLD
    assert run.client.version_for(run.hotkeys["new"]) == NEW
