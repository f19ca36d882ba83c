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
import math
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from niche.errors import InvalidRequest
from niche.protocol import MAX_STATE_ELEMENTS, MAX_STATES, StatesCommitment


class BadState(ValueError):
    """A state that does not match its commitment (size, hash, values): the answer fails."""


def _float32_cpu(state: torch.Tensor) -> torch.Tensor:
    """The state as a float32 CPU C-contiguous tensor (itself when it already is one)."""
    return state.detach().to("cpu", torch.float32).contiguous()


def _little_endian(tensor: torch.Tensor) -> memoryview:
    """A view of a float32 CPU C-contiguous tensor's values as little-endian float32."""
    return memoryview(tensor.numpy().astype("<f4", copy=False))


def state_bytes(state: torch.Tensor) -> bytes:
    """Raw float32 little-endian C-order bytes: what is hashed and sent."""
    return _little_endian(_float32_cpu(state)).tobytes()


RawState = bytes | memoryview
"""A state's raw float32 little-endian C-order bytes: `bytes`, or a flat byte view of the
memory of a tensor its holder owns (`state_view`)."""


def state_view(state: torch.Tensor) -> memoryview:
    """`state_bytes` without the copy: a flat read-only byte view of the state's own memory
    (converted first unless it is a float32 CPU C-contiguous tensor, a copy anyway). The view
    keeps that memory alive and sees any later write to the tensor, so its holder must own
    the tensor: `generate_with_states`' states are fresh tensors nobody else keeps. A tensor
    that is a slice of larger memory is copied, so a store that counts the view's bytes
    never holds more than it counts."""
    tensor = _float32_cpu(state)
    if tensor.untyped_storage().nbytes() != tensor.numel() * 4:
        tensor = tensor.clone()
    values = _little_endian(tensor)
    if not values.nbytes:  # memoryview cannot cast a shape with a zero in it
        return memoryview(b"")
    return values.cast("B").toreadonly()


def states_bytes(states: Sequence[torch.Tensor]) -> tuple[list[int], list[memoryview]]:
    """(shape, each state's raw bytes as a `state_view`) of x_1..x_N, not copied: the
    commitment hashes them and the miner's store keeps them. A copy of FLUX.1-dev's 28
    states at 1024x1024 (28 MiB, fresh pages each answer) cost 13 ms of the answer's path on
    this 2-core box (bench/overhead.py (b))."""
    return _answer_shape(states), [state_view(s) for s in states]


def _answer_shape(states: Sequence[torch.Tensor]) -> list[int]:
    """The one shape of an answer's 1..MAX_STATES states; ValueError otherwise."""
    if not states or len(states) > MAX_STATES:
        raise ValueError(f"an answer commits to 1..{MAX_STATES} states, not {len(states)}")
    shape = list(states[0].shape)
    if any(list(s.shape) != shape for s in states):
        raise ValueError("all states of one answer have one shape")
    return shape


_HASHERS = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1),
                              thread_name_prefix="niche-sha256")
"""hashlib releases the GIL on large buffers: 28 MiB of states hash in 16 ms on one core of
this machine, 9 ms on two."""


def _sha256_all(raw: Sequence[RawState]) -> list[str]:
    if len(raw) < 4 or sum(len(r) for r in raw) < (4 << 20):
        return [_sha256(r) for r in raw]
    return list(_HASHERS.map(_sha256, raw))


def _sha256(raw: RawState) -> str:
    return hashlib.sha256(raw).hexdigest()


def commit_raw(shape: Sequence[int], raw: Sequence[RawState], compute_dtype: str,
               kernels: Mapping[str, str] | None = None, *,
               sha256: Sequence[str] | None = None) -> StatesCommitment:
    """The commitment of states already converted (`states_bytes`); `sha256`: their digests
    when already computed (`StreamedHashes`)."""
    digests = list(sha256) if sha256 is not None else _sha256_all(raw)
    if len(digests) != len(raw):
        raise ValueError(f"{len(digests)} digests for {len(raw)} states")
    return StatesCommitment(shape=list(shape), compute_dtype=compute_dtype,
                            kernels=dict(kernels or {}), sha256=digests)


class StreamedHashes:
    """Hashes an answer's states while the engine still computes the next ones: the engine
    hands each recorded state to `add` (its `on_state`), big ones are hashed at once on the
    hashing threads, and `finish` waits only for what is left, usually the last state. A GPU
    box hashes step k while it computes step k+1; FLUX.1-dev's 28 states at 1024x1024 are
    28 MiB, 9 ms of hashing on this 2-core box (bench/overhead.py (b)).

    `finish` gives the digests only for exactly the tensors it was handed, in order; for
    anything else (another list, a failed `add`) it gives None and the caller hashes the
    states it holds, so a commitment is always the hash of the states the miner keeps."""

    STREAM_BYTES = 256 * 1024
    """Smaller states (the tiny models') are hashed in `finish`: a thread hop per state
    would cost more than the hash."""

    def __init__(self) -> None:
        self._seen: list[torch.Tensor] = []
        self._views: list[memoryview | None] = []
        self._hashes: list[Future[str] | None] = []
        self._failed = False

    def add(self, state: torch.Tensor) -> None:
        """The engine recorded `state` (a fresh tensor it no longer writes to)."""
        try:
            self._seen.append(state)
            if state.numel() * 4 < self.STREAM_BYTES:
                self._views.append(None)
                self._hashes.append(None)
                return
            view = state_view(state)
            self._views.append(view)
            self._hashes.append(_HASHERS.submit(_sha256, view))
        except Exception:  # e.g. the hashing threads shut down at exit: finish says None
            self._failed = True

    def finish(self, states: Sequence[torch.Tensor]
               ) -> tuple[list[int], list[memoryview], list[str]] | None:
        """(shape, views, digests) of `states` if they are the tensors `add` was handed, in
        order; else None."""
        if self._failed or len(states) != len(self._seen) or any(
                a is not b for a, b in zip(states, self._seen, strict=True)):
            return None
        try:
            shape = _answer_shape(states)
        except ValueError:
            return None  # the caller's states_bytes says what is wrong
        views = [v if v is not None else state_view(s)
                 for v, s in zip(self._views, states, strict=True)]
        digests = [h.result() if h is not None else _sha256(v)
                   for h, v in zip(self._hashes, views, strict=True)]
        return shape, views, digests


def commit(states: Sequence[torch.Tensor], compute_dtype: str,
           kernels: Mapping[str, str] | None = None) -> StatesCommitment:
    """The commitment an answer carries for x_1..x_N (`kernels`: its declared kernel
    choices, protocol 4+)."""
    shape, raw = states_bytes(states)
    return commit_raw(shape, raw, compute_dtype, kernels)


def encode_state(state: torch.Tensor) -> str:
    return base64.b64encode(state_bytes(state)).decode("ascii")


def _expected_bytes(index: int, commitment: StatesCommitment) -> int:
    """The byte length of committed state x_index, checked before anything is read."""
    if not 1 <= index <= len(commitment.sha256):
        raise BadState(f"state {index} is not among the {len(commitment.sha256)} committed")
    shape = commitment.shape  # bounded by StatesCommitment; checked again in Python ints
    elements = math.prod(shape)
    if min(shape, default=0) < 1 or not 0 < elements <= MAX_STATE_ELEMENTS:
        raise BadState(f"committed shape {commitment.shape} is out of bounds")
    return elements * 4


def decode_state(data: str, index: int, commitment: StatesCommitment) -> torch.Tensor:
    """The committed state x_index from its base64 blob, or BadState saying what is wrong."""
    expected = _expected_bytes(index, commitment)
    if len(data) != 4 * ((expected + 2) // 3):
        raise BadState(f"state {index}: {len(data)} base64 characters, expected "
                       f"{4 * ((expected + 2) // 3)} for shape {commitment.shape}")
    try:
        raw = base64.b64decode(data.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise BadState(f"state {index}: malformed base64") from None
    return decode_state_bytes(raw, index, commitment)


def decode_state_bytes(raw: bytes | memoryview, index: int, commitment: StatesCommitment
                       ) -> torch.Tensor:
    """The committed state x_index from its raw float32 bytes (a protocol-4 binary fetch,
    niche/wire.py), or BadState: length, then hash, then values."""
    expected = _expected_bytes(index, commitment)
    if len(raw) != expected:
        raise BadState(f"state {index}: {len(raw)} bytes, expected {expected}")
    if hashlib.sha256(raw).hexdigest() != commitment.sha256[index - 1]:
        raise BadState(f"state {index} does not match the hash the answer committed to")
    array = np.frombuffer(raw, dtype="<f4").reshape(commitment.shape)  # sizes checked >= 1
    if not np.isfinite(array).all():
        raise BadState(f"state {index} holds NaN or infinite values")
    return torch.from_numpy(array.astype(np.float32))


# ----------------------------------------------------------------------------- files
def save_states_file(path: Path, states: Sequence[torch.Tensor], compute_dtype: str) -> None:
    """x_1..x_N as a safetensors file (keys x_1..x_N), for `niche verify --states`."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"x_{i}": s.detach().to("cpu", torch.float32).contiguous()
               for i, s in enumerate(states, start=1)}
    save_file(tensors, str(path), metadata={"compute_dtype": compute_dtype})


def load_states_file(path: Path) -> tuple[dict[int, torch.Tensor], str]:
    """({i: x_i}, compute dtype) from a states file, or InvalidRequest(field="states")."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise InvalidRequest(f"no such file {path}", field="states")
    states: dict[int, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            dtype = (f.metadata() or {}).get("compute_dtype", "float32")
            for key in f.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                if not key.startswith("x_") or not key[2:].isdigit():
                    raise InvalidRequest(f"{path}: unexpected tensor {key!r} (want x_1..x_N)",
                                         field="states")
                index = int(key[2:])
                if not 1 <= index <= MAX_STATES:
                    raise InvalidRequest(f"{path}: state index {index} out of range",
                                         field="states")
                tensor = f.get_tensor(key)
                if tensor.numel() > MAX_STATE_ELEMENTS:
                    raise InvalidRequest(f"{path}: {key} is too large", field="states")
                states[index] = tensor.to(torch.float32)
    except (SafetensorError, OSError, ValueError) as exc:
        raise InvalidRequest(f"{path} is not a states file: {exc}", field="states") from None
    if dtype not in ("float32", "bfloat16", "float16"):
        raise InvalidRequest(f"{path}: compute_dtype {dtype!r} unknown", field="states")
    return states, dtype
