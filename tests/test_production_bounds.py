"""Bounds checked against the subnet's production settings, not the tiny defaults.

The gateway's default deadline against the largest request its catalog accepts: FLUX.1-dev
at 1536x1536 and 50 steps is ~4x the work of its 1024x1024, 28-step default (60 s timeout),
so a flat 60 s deadline cut off honest miners mid-generation and cooled them down."""
from __future__ import annotations

import pytest

from niche.gateway.service import RETRY_ROOM, default_deadline
from niche.models.spec import load_spec
from niche.protocol import GenerationParams


@pytest.mark.parametrize("model", ["flux-dev", "flux-schnell", "flux-mini", "kolors"])
def test_the_default_deadline_holds_the_largest_request_with_room_for_a_retry(model):
    spec = load_spec(model)
    d, limits = spec.defaults, spec.limits
    largest = GenerationParams(model=model, prompt="x", seed=1, width=limits.max_size,
                               height=limits.max_size, steps=limits.max_steps)
    work = (limits.max_size ** 2 * limits.max_steps) / (d.width * d.height * d.steps)
    deadline = default_deadline(spec, largest, floor=60.0)
    assert deadline >= RETRY_ROOM * d.timeout * work >= d.timeout * work
    default = GenerationParams(model=model, prompt="x", seed=1)
    assert default_deadline(spec, default, floor=60.0) == max(60.0, RETRY_ROOM * d.timeout)
    small = GenerationParams(model=model, prompt="x", seed=1, width=limits.min_size,
                             height=limits.min_size, steps=limits.min_steps)
    assert default_deadline(spec, small, floor=60.0) == max(60.0, RETRY_ROOM * d.timeout)


def test_flux_dev_at_its_largest_gets_minutes_not_the_flat_minute():
    spec = load_spec("flux-dev")
    largest = GenerationParams(model="flux-dev", prompt="x", seed=1, width=1536, height=1536,
                               steps=50)
    assert default_deadline(spec, largest, floor=60.0) > 400  # 2 x 60 s x 4.0


def test_url_answers_are_kept_within_their_byte_cap(tmp_path):
    """`response_format: url` images: an hour of 100 images a minute is ~13 GiB of PNG, so
    the store keeps the newest within `max_bytes` and the oldest links answer 404 first."""
    from niche.gateway.db import GatewayDB
    from niche.gateway.store import ImageStore

    now = [1000.0]
    store = ImageStore(GatewayDB(tmp_path / "gateway.sqlite"), ttl=3600.0,
                       max_bytes=10_000, clock=lambda: now[0])
    tokens = []
    for i in range(8):
        tokens.append(store.put(bytes([i]) * 3000))
        now[0] += 1
    kept = [store.get(t) is not None for t in tokens]
    assert kept == [False] * 5 + [True] * 3  # 3 x 3000 bytes fit in 10,000
    assert store.get(tokens[-1]) == bytes([7]) * 3000
    huge = store.put(b"x" * 50_000)  # larger than the cap alone: kept, all else goes
    assert store.get(huge) is not None and all(store.get(t) is None for t in tokens)
    now[0] += 3601
    assert store.get(huge) is None  # and the ttl still holds


def test_a_signature_stays_fresh_for_as_long_as_its_body_may_take(tmp_path):
    """The miner checks a signature's age once the whole body is in, and a body may take
    `body_timeout`: a round's ~96 conditioning images (~280 MiB) need 22 s at 100 Mbit/s."""
    import time

    from niche.auth import RequestVerifier, sign_request
    from niche.chain.wallets import create_wallet
    from niche.miner.service import MinerConfig

    config = MinerConfig(netuid=1)
    assert config.auth_max_age >= config.body_timeout
    validator = create_wallet("v", "hot", tmp_path)
    miner = create_wallet("m", "hot", tmp_path).hotkey.ss58_address
    verifier = RequestVerifier(miner, max_age=config.auth_max_age,
                               allowed_skew=config.auth_allowed_skew)
    body = b'{"a conditioning image": "..."}'
    signed = sign_request(validator, method="POST", path="/v1/generate", body=body,
                          receiver=miner, nonce_ns=time.time_ns() - 25 * 10**9)
    assert verifier.verify(signed, body, method="POST", path="/v1/generate") == \
        validator.hotkey.ss58_address


def test_states_dropped_for_space_before_their_ttl_are_said(tmp_path, caplog):
    """The byte cap, not the ttl, decides how long states stay once several GPUs answer
    behind one hotkey (8 GiB holds 292 FLUX.1-dev answers of 28 MiB: 7 minutes at 42 answers
    a minute). An audit then finds them gone; the operator reads why, with the flag to raise."""
    import logging

    from niche.miner.state_store import StateStore

    now = [0.0]
    answer = [b"\x00" * 4000]  # a 28 MiB answer, scaled down with the cap
    memory = StateStore(max_bytes=10_000, ttl=600.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="niche.miner"):
        for i in range(3):
            memory.put_raw("validator", f"answer-{i}", answer)
            now[0] += 60
    assert memory.early.count == 1 and memory.get("validator", "answer-0") is None
    (said,) = [r.getMessage() for r in caplog.records if "dropped for space" in r.getMessage()]
    assert "120s old" in said and "--states.max_mb" in said
    now[0] += 600  # past the ttl: going then is no early drop
    memory.put_raw("validator", "answer-3", answer)
    assert memory.early.count == 1

    disk = StateStore(max_bytes=4000, ttl=600.0, path=tmp_path / "states.sqlite",
                      disk_max_bytes=10_000)
    for i in range(3):
        disk.put_raw("validator", f"answer-{i}", answer)
    disk.close()  # writes what is queued
    assert disk.disk is not None and disk.disk.early.count == 1
    assert disk.early.count == 0  # memory's drops are the disk's to keep: none said


def test_the_ray_object_store_grows_with_the_replicas():
    """Each replica's answer crosses Ray's object store: ~115 MiB at 1536x1536 and 50
    FLUX.1-dev steps, so four replicas answering together overflowed a fixed 256 MiB."""
    from niche.commands.engine_args import add_backend_args
    from niche.errors import ConfigError
    from niche.models.ray_backend import RayConfig

    assert RayConfig(replicas=1).store_mb() == 256
    assert RayConfig(replicas=4).store_mb() >= 4 * 115
    assert RayConfig(replicas=4, object_store_mb=1024).store_mb() == 1024
    with pytest.raises(ConfigError, match="object_store_mb"):
        RayConfig(object_store_mb=10)
    import argparse

    parser = argparse.ArgumentParser()
    add_backend_args(parser)
    args = parser.parse_args(["--ray.object_store_mb", "2048"])
    assert args.ray_object_store_mb == 2048
