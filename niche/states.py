"""Sampler states across the wire: the bytes a miner hashes and sends, and a decoder that a
stranger's blob cannot abuse (length checked before anything is allocated, hash checked
before the values are used, non-finite values refused).

A state is a float32 tensor in the family's latent layout (FLUX: packed (1, tokens, 64);
Kolors: (1, 4, h/8, w/8)); on the wire it is its raw little-endian C-order bytes in base64.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Sequence

import numpy as np
import torch

from niche.protocol import MAX_STATE_ELEMENTS, MAX_STATES, StatesCommitment


class BadState(ValueError):
    """A state that does not match its commitment (size, hash, values): the answer fails."""


def state_bytes(state: torch.Tensor) -> bytes:
    """Raw float32 little-endian C-order bytes: what is hashed and sent."""
    array = state.detach().to("cpu", torch.float32).contiguous().numpy()
    return array.astype("<f4", copy=False).tobytes()


def commit(states: Sequence[torch.Tensor], compute_dtype: str) -> StatesCommitment:
    """The commitment an answer carries for x_1..x_N."""
    if not states or len(states) > MAX_STATES:
        raise ValueError(f"an answer commits to 1..{MAX_STATES} states, not {len(states)}")
    shape = list(states[0].shape)
    if any(list(s.shape) != shape for s in states):
        raise ValueError("all states of one answer have one shape")
    return StatesCommitment(shape=shape, compute_dtype=compute_dtype,
                            sha256=[hashlib.sha256(state_bytes(s)).hexdigest() for s in states])


def encode_state(state: torch.Tensor) -> str:
    return base64.b64encode(state_bytes(state)).decode("ascii")


def decode_state(data: str, index: int, commitment: StatesCommitment) -> torch.Tensor:
    """The committed state x_index from its base64 blob, or BadState saying what is wrong."""
    if not 1 <= index <= len(commitment.sha256):
        raise BadState(f"state {index} is not among the {len(commitment.sha256)} committed")
    elements = int(np.prod(commitment.shape))
    if not 0 < elements <= MAX_STATE_ELEMENTS:
        raise BadState(f"committed shape {commitment.shape} is out of bounds")
    expected = elements * 4
    if len(data) != 4 * ((expected + 2) // 3):
        raise BadState(f"state {index}: {len(data)} base64 characters, expected "
                       f"{4 * ((expected + 2) // 3)} for shape {commitment.shape}")
    try:
        raw = base64.b64decode(data.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise BadState(f"state {index}: malformed base64") from None
    if len(raw) != expected:
        raise BadState(f"state {index}: {len(raw)} bytes, expected {expected}")
    if hashlib.sha256(raw).hexdigest() != commitment.sha256[index - 1]:
        raise BadState(f"state {index} does not match the hash the answer committed to")
    array = np.frombuffer(raw, dtype="<f4").reshape(commitment.shape)
    if not np.isfinite(array).all():
        raise BadState(f"state {index} holds NaN or infinite values")
    return torch.from_numpy(array.astype(np.float32))
