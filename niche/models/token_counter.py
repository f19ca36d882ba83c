"""Counting a prompt's tokens the way the pipeline's text encoder will see them.

A miner counts the tokens of every request before it queues it (prompts over the model's
limit are refused), on the event loop. transformers' `tokenizer(text)` spends most of its
time in Python (argument handling, BatchEncoding) around the Rust tokenizer of a fast
tokenizer; after a 20 ms generation on a shared 2-core box that call costs ~0.4 ms with cold
caches, the Rust `encode` alone ~0.15 ms, for the same ids. So a fast tokenizer is counted
through its backend once a few probe texts (special tokens, NFKC expansions, CJK, emoji)
give the same ids both ways; anything else (a slow tokenizer such as Kolors' ChatGLM, a
backend that disagrees) is counted through `tokenizer(text)`.
"""
from __future__ import annotations

import threading
from copy import deepcopy
from typing import Any

PROBE_TEXTS = (
    "a red circle on a blue background",
    "  Leading and trailing spaces, UPPER case, digits 0123456789 and punctuation!?  ",
    "\ufdfa \u00bd \u2460 \ufb01 caf\u00e9 e\u0301 \u212b",  # NFKC expansions, combining marks
    "\u4e00\u5e45\u5c71\u6c34\u753b, \u3072\u3089\u304c\u306a, \ud55c\uad6d\uc5b4, "
    "\u0627\u0644\u0639\u0631\u0628\u064a\u0629",
    "emoji \U0001f5bc\ufe0f\U0001f468\u200d\U0001f469\u200d\U0001f467 tabs\tand\nnewlines",
    "</s> <pad> <unk> [CLS] <|endoftext|> <extra_id_0>",
)
"""Texts on which the backend and `tokenizer(text)` must agree before the backend counts."""


class TokenCounter:
    """Counts tokens on a private copy of `tokenizer`, under its own lock.

    The copy matters: transformers' fast tokenizers keep their truncation and padding
    settings in the shared Rust object, so a count (no truncation) running beside a
    generation's encode (padding to max_length) would change the padding of that prompt's
    embeddings, and an honest answer would no longer match its own request."""

    def __init__(self, tokenizer: Any):
        self._lock = threading.Lock()
        self._tokenizer = deepcopy(tokenizer)
        self._backend = self._agreeing_backend(self._tokenizer)

    @staticmethod
    def _agreeing_backend(tokenizer: Any) -> Any:
        """The Rust tokenizer of a fast `tokenizer`, set to neither truncate nor pad, if it
        gives the same ids as `tokenizer(text)` on every probe text; else None."""
        backend = getattr(tokenizer, "backend_tokenizer", None) \
            if getattr(tokenizer, "is_fast", False) else None
        if backend is None:
            return None
        backend.no_truncation()
        backend.no_padding()
        for text in PROBE_TEXTS:
            expected = tokenizer(text, truncation=False).input_ids
            if list(backend.encode(text, add_special_tokens=True).ids) != list(expected):
                return None
        return backend

    @property
    def uses_backend(self) -> bool:
        """Whether counts go straight to the Rust tokenizer (the probe texts agreed)."""
        return self._backend is not None

    def count(self, text: str) -> int:
        """Tokens `text` becomes, special tokens included, without truncation."""
        with self._lock:
            if self._backend is not None:
                return len(self._backend.encode(text, add_special_tokens=True).ids)
            return len(self._tokenizer(text, truncation=False).input_ids)
