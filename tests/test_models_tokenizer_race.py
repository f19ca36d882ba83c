"""Counting a request's tokens never changes another request's embeddings.

transformers' tokenizers keep truncation and padding settings in the shared Rust object. The
engine resolves requests (and counts their tokens) outside its lock, beside a generation
that encodes a prompt padded to max_length; counting on the pipeline's own tokenizer made
that encode come out unpadded now and then, so an honest miner under concurrent requests
failed its step audits (found by scripts/loaded_runs.sh: step 0 error 0.09 > 0.00175)."""
from __future__ import annotations

import threading

import pytest
import torch

from niche.protocol import GenerationParams

OTHER = "a lighthouse on a cliff above a stormy sea"


def _hammer_resolve(engine, model: str, stop: threading.Event, done: list[int]) -> None:
    """Resolve (and so count the tokens of) another request until stopped; `done` gets the
    number of resolves, so a test can tell that the hammering really happened."""
    count = 0
    while not stop.is_set():
        engine.resolve(GenerationParams(model=model, prompt=OTHER, seed=1))
        count += 1
    done.append(count)


@pytest.mark.parametrize("model", ["flux-schnell", "kolors"])
def test_encodes_beside_token_counts_are_identical(tiny_engine, model):
    family = tiny_engine.family(model)
    tokenizer = family.bounding_tokenizer()
    prompt = "a red lighthouse"

    def encode() -> torch.Tensor:  # what the pipeline's encode_prompt asks of the tokenizer
        return tokenizer([prompt], padding="max_length", max_length=64, truncation=True,
                         return_tensors="pt").input_ids

    reference = encode()
    assert reference.shape == (1, 64)
    stop, done = threading.Event(), []
    threads = [threading.Thread(target=_hammer_resolve, args=(tiny_engine, model, stop, done))
               for _ in range(2)]
    for t in threads:
        t.start()
    try:
        differing = sum(not torch.equal(encode(), reference) for _ in range(1500))
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert len(done) == 2 and min(done) > 100, done  # both resolvers ran all along
    assert differing == 0, f"{differing} of 1500 encodes changed by concurrent token counts"


def test_states_of_a_generation_beside_resolves_are_its_own(tiny_engine):
    params = tiny_engine.resolve(GenerationParams(model="flux-schnell", prompt="a red boat",
                                                  seed=5))
    _, alone = tiny_engine.generate_with_states(params)
    stop, done = threading.Event(), []
    thread = threading.Thread(target=_hammer_resolve,
                              args=(tiny_engine, "flux-schnell", stop, done))
    thread.start()
    try:
        runs = [tiny_engine.generate_with_states(params)[1] for _ in range(8)]
    finally:
        stop.set()
        thread.join()
    assert done and done[0] > 8, done
    for states in runs:
        assert all(torch.equal(a, b) for a, b in zip(alone, states, strict=True))
