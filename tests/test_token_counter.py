"""A prompt's token count is the one the pipeline's tokenizer gives, whichever way it is
counted (niche/models/token_counter.py): the Rust backend for a fast tokenizer that agrees,
`tokenizer(text)` otherwise."""
from __future__ import annotations

from copy import deepcopy

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from niche.models.token_counter import PROBE_TEXTS, TokenCounter


def _reference(tokenizer, text: str) -> int:
    return len(tokenizer(text, truncation=False).input_ids)


@pytest.fixture(scope="module")
def flux_counter(tiny_engine) -> TokenCounter:
    """One counter for the module: building one copies the tokenizer and runs the probes."""
    return TokenCounter(tiny_engine.family("flux-schnell").bounding_tokenizer())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(max_size=400))
def test_backend_counts_equal_the_tokenizers_own(tiny_engine, flux_counter, text):
    tokenizer = tiny_engine.family("flux-schnell").bounding_tokenizer()
    assert flux_counter.uses_backend
    assert flux_counter.count(text) == _reference(tokenizer, text)


def test_long_and_expanding_prompts_are_counted_in_full(tiny_engine, flux_counter):
    tokenizer = tiny_engine.family("flux-schnell").bounding_tokenizer()
    for text in ("word " * 2000, "\ufdfa" * 300, *PROBE_TEXTS):
        assert flux_counter.count(text) == _reference(tokenizer, text)
    assert flux_counter.count("word " * 2000) > 1000  # no truncation at the model's limit


def test_a_slow_tokenizer_is_counted_through_its_call(tiny_engine):
    tokenizer = tiny_engine.family("kolors").bounding_tokenizer()
    counter = TokenCounter(tokenizer)
    assert not counter.uses_backend
    for text in PROBE_TEXTS:
        assert counter.count(text) == _reference(tokenizer, text)


def test_a_backend_that_disagrees_with_the_tokenizer_is_not_used(tiny_engine):
    """A fast tokenizer that changes the text in Python before its backend sees it (here:
    lower case) must be counted through its call, or prompts would be miscounted."""
    tokenizer = deepcopy(tiny_engine.family("flux-schnell").bounding_tokenizer())

    class LowerCasing(type(tokenizer)):  # type: ignore[misc]
        def __call__(self, text, *args, **kwargs):
            return super().__call__(text.lower(), *args, **kwargs)

    tokenizer.__class__ = LowerCasing
    counter = TokenCounter(tokenizer)
    assert not counter.uses_backend
    assert counter.count("UPPER CASE WORDS") == _reference(tokenizer, "UPPER CASE WORDS")


def test_counting_leaves_the_pipelines_tokenizer_settings_alone(tiny_engine):
    tokenizer = tiny_engine.family("flux-schnell").bounding_tokenizer()
    before = (tokenizer.backend_tokenizer.truncation, tokenizer.backend_tokenizer.padding)
    TokenCounter(tokenizer).count("a red boat")
    assert (tokenizer.backend_tokenizer.truncation, tokenizer.backend_tokenizer.padding) == before


@pytest.mark.parametrize("model", ["flux-schnell", "kolors"])
def test_resolve_refuses_a_prompt_one_token_over_the_limit(tiny_engine, model):
    """The engine's resolve counts with the counter: a prompt of exactly the model's limit
    passes, one token more is refused on the prompt field (backend and fallback alike)."""
    from niche.errors import InvalidRequest
    from niche.protocol import GenerationParams

    family = tiny_engine.family(model)
    tokenizer = family.bounding_tokenizer()
    limit = tiny_engine.spec(model).defaults.max_sequence_length
    words = 1
    while _reference(tokenizer, "word " * (words + 1)) <= limit:
        words += 1
    at_limit = "word " * words
    over = at_limit + "word"
    assert _reference(tokenizer, at_limit) <= limit < _reference(tokenizer, over)
    tiny_engine.resolve(GenerationParams(model=model, prompt=at_limit, seed=1))
    with pytest.raises(InvalidRequest) as refused:
        tiny_engine.resolve(GenerationParams(model=model, prompt=over, seed=1))
    assert refused.value.field == "prompt"
