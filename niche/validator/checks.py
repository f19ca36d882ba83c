"""Checks on EVERY answer that need no regeneration: the right size and mode, and not a copy
of an earlier answer (exact bytes, or a perceptual near-copy).

These are what keep a miner from answering with a cached image: each challenge has a fresh
prompt and seed, so an honest answer never repeats.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from niche.validator.state import Answer

WRONG_SIZE = "wrong_size"
WRONG_MODE = "wrong_mode"
DUPLICATE = "duplicate_answer"


@dataclass(frozen=True)
class Fingerprint:
    sha256: str
    """Of the decoded pixels (not the file): re-encoding an old answer does not hide it."""
    phash: int
    """64-bit difference hash: survives light noise, re-encoding and JPEG."""


def fingerprint(image: Image.Image) -> Fingerprint:
    rgb = image.convert("RGB")
    digest = hashlib.sha256()
    digest.update(f"{rgb.width}x{rgb.height}:".encode())
    digest.update(rgb.tobytes())
    return Fingerprint(digest.hexdigest(), dhash(rgb))


def dhash(image: Image.Image, size: int = 8) -> int:
    """Difference hash: sign of horizontal gradients on a (size+1) x size grey thumbnail."""
    grey = np.asarray(image.convert("L").resize((size + 1, size), Image.Resampling.BOX),
                      dtype=np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).flatten()
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    return value


def hamming(a: int, b: int) -> int:
    return int((a ^ b).bit_count())


def shape_problem(image: Image.Image, width: int, height: int) -> str | None:
    """A reason when the image is not what the challenge asked for, else None."""
    if image.mode != "RGB":
        return f"{WRONG_MODE}: {image.mode}, expected RGB"
    if image.size != (width, height):
        return f"{WRONG_SIZE}: {image.width}x{image.height}, expected {width}x{height}"
    return None


class AnswerIndex:
    """Recent answers' fingerprints (loaded from the state file, so a restart remembers)."""

    def __init__(self, answers: Iterable[Answer] = (), max_distance: int = 4):
        self.max_distance = max_distance
        self._by_sha: dict[str, Answer] = {}
        self._phashes: list[int] = []
        self._answers: list[Answer] = []
        self._array: np.ndarray | None = None  # _phashes as uint64, rebuilt lazily
        for answer in answers:
            self.add(answer)

    def __len__(self) -> int:
        return len(self._answers)

    def add(self, answer: Answer) -> None:
        self._by_sha.setdefault(answer.sha256, answer)
        self._phashes.append(answer.phash)
        self._answers.append(answer)
        self._array = None

    def exact(self, fp: Fingerprint) -> Answer | None:
        """An earlier answer with these very pixels, else None."""
        return self._by_sha.get(fp.sha256)

    def match(self, fp: Fingerprint) -> Answer | None:
        """An earlier answer this one copies (exactly or perceptually), else None. A
        perceptual match alone is no proof: distinct honest images share a 64-bit dHash
        within 4 bits once in ~1e6 pairs, so the validator audits such an answer instead
        of zeroing it (the step check tells a replay from a fresh computation exactly)."""
        exact = self._by_sha.get(fp.sha256)
        if exact is not None:
            return exact
        if not self._phashes:
            return None
        if self._array is None:
            self._array = np.array(self._phashes, dtype=np.uint64)
        xor = np.bitwise_xor(self._array, np.uint64(fp.phash))
        distances = np.bitwise_count(xor) if hasattr(np, "bitwise_count") else np.array(
            [int(x).bit_count() for x in xor])
        best = int(np.argmin(distances))
        if int(distances[best]) <= self.max_distance:
            return self._answers[best]
        return None

    def prune(self, min_round: int) -> None:
        keep = [a for a in self._answers if a.round >= min_round]
        if len(keep) == len(self._answers):
            return
        self._by_sha.clear()
        self._phashes.clear()
        self._answers.clear()
        self._array = None
        for answer in keep:
            self.add(answer)
