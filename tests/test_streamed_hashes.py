"""States hashed while the engine computes the next steps: the commitment is still the hash
of exactly the states the miner keeps and serves, whatever the engine or wrapper does."""
from __future__ import annotations

import asyncio
import hashlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from miner_support import NETUID, StubEngine, module_net

from niche import states as states_module
from niche.imaging import encode_image
from niche.miner.service import MinerConfig, MinerService, streams_states
from niche.protocol import GenerateRequest, GenerationParams
from niche.states import StreamedHashes, commit, state_bytes, states_bytes

net = module_net("streamnet")


def _big(seed: int, count: int = 6) -> list[torch.Tensor]:
    """FLUX.1-dev-sized states at 1024x1024 (1 MiB each): streamed at the real threshold."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn((1, 4096, 64), generator=gen) for _ in range(count)]


def _fed(states: list[torch.Tensor]) -> StreamedHashes:
    hashes = StreamedHashes()
    for state in states:
        hashes.add(state)
    return hashes


def test_streamed_digests_are_the_commitment_of_the_same_tensors():
    states = _big(1)
    streamed = _fed(states).finish(states)
    assert streamed is not None
    shape, views, digests = streamed
    assert shape == [1, 4096, 64]
    assert [bytes(v) for v in views] == [state_bytes(s) for s in states]
    assert digests == commit(states, "float32").sha256
    small = [torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(i))
             for i in range(4)]  # the tiny models': hashed in finish, not streamed
    hashes = _fed(small)
    assert hashes._hashes == [None] * 4
    assert (hashes.finish(small) or ((), (), ()))[2] == commit(small, "float32").sha256


def test_other_tensors_than_those_handed_over_are_never_committed_with_old_hashes():
    """A wrapper that hands over one list and returns another (a copy, another order, one
    more or one fewer) gets None: the miner then hashes what it actually keeps."""
    states = _big(2)
    assert _fed(states).finish([s.clone() for s in states]) is None
    assert _fed(states).finish(list(reversed(states))) is None
    assert _fed(states).finish([*states, states[0]]) is None
    assert _fed(states).finish(states[:-1]) is None
    assert _fed([]).finish([]) is None
    mixed = [states[0], torch.zeros(1, 8, 8)]
    assert _fed(mixed).finish(mixed) is None  # shapes differ: states_bytes says why


def test_a_failed_hand_over_falls_back_to_hashing_at_the_end(monkeypatch):
    closed = ThreadPoolExecutor(1)
    closed.shutdown()
    monkeypatch.setattr(states_module, "_HASHERS", closed)  # e.g. at interpreter exit
    states = _big(3, count=2)
    assert _fed(states).finish(states) is None


def test_the_engine_hands_over_the_very_tensors_it_returns(tiny_engine):
    """At Kolors' production step count: every state, in order, the same objects; the image
    is the one generated without `on_state`."""
    params = GenerationParams(model="kolors", prompt="a lighthouse at dusk", seed=5, steps=30)
    seen: list[torch.Tensor] = []
    image, states = tiny_engine.generate_with_states(params, on_state=seen.append)
    assert len(states) == 30 and len(seen) == 30
    assert all(a is b for a, b in zip(seen, states, strict=True))
    _, views = states_bytes(states)  # fresh tensors of their own: kept without a copy
    assert all(np.shares_memory(v.obj, s.numpy()) for v, s in zip(views, states, strict=True))
    plain_image, plain_states = tiny_engine.generate_with_states(params)
    assert encode_image(image) == encode_image(plain_image)
    assert all(torch.equal(a, b) for a, b in zip(states, plain_states, strict=True))


def test_streams_states_is_read_from_the_method_a_wrapper_has(tiny_engine):
    class Forwarding:  # forwards everything, overrides generate_with_states (the cheats)
        def __init__(self, engine):
            self._engine = engine

        def __getattr__(self, name):
            return getattr(self._engine, name)

        def generate_with_states(self, params, image=None):
            return self._engine.generate_with_states(params, image)

    class Plain:  # forwards everything: the engine's own method, which streams
        def __init__(self, engine):
            self._engine = engine

        def __getattr__(self, name):
            return getattr(self._engine, name)

    assert streams_states(tiny_engine) and streams_states(Plain(tiny_engine))
    assert not streams_states(Forwarding(tiny_engine)) and not streams_states(StubEngine())
    assert not streams_states(object())


@pytest.mark.parametrize("threshold", [0, StreamedHashes.STREAM_BYTES])
def test_a_miner_commits_to_the_states_it_keeps(net, tiny_engine, monkeypatch, threshold):
    """Through MinerService with the real tiny engine, streamed (threshold 0: every state
    on the hashing threads while the next steps run) or hashed at the end: the answer's
    commitment hashes exactly the states the miner serves, and is the one a fresh
    generation of the same request commits to."""
    monkeypatch.setattr(StreamedHashes, "STREAM_BYTES", threshold)
    service = MinerService(tiny_engine, net.wallets["miner"],
                           MinerConfig(netuid=NETUID, requests_per_minute=0), chain=net.chain)
    try:
        assert service._streams_states
        params = tiny_engine.resolve(GenerationParams(model="flux-schnell", seed=11,
                                                      prompt="a red kite"))
        request = GenerateRequest(request_id=f"stream-{threshold}", params=params)
        answer = asyncio.run(service.generate(request, None, "5caller"))
        committed = answer.response.states
        assert committed is not None
        kept = service.states.get("5caller", request.request_id)
        assert kept is not None and len(kept) == params.steps
        assert committed.sha256 == [hashlib.sha256(k).hexdigest() for k in kept]
        _, fresh = tiny_engine.generate_with_states(params)
        assert committed.sha256 == commit(fresh, "float32").sha256
    finally:
        service.close()
