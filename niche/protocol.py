"""Wire format between validators and miners ("synapses"), versioned.

Every model here is what crosses the network, so every field is bounded: a miner validates a
request before any model runs, and a validator validates an answer before scoring it.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from niche.errors import one_line

_CANONICAL_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"))
"""What `json.dumps(..., sort_keys=True, separators=(",", ":"))` writes, built once: dumps
builds a new encoder for every call with non-default arguments (on the answer's path)."""

PROTOCOL_VERSION = 4
"""The newest version this niche speaks; bumped on any incompatible change.
2: answers commit to their sampler states (`StatesCommitment`), fetched at /v1/states.
3: /v1/info lists every version a miner speaks (`protocol_versions`) and a reader ignores
   fields it does not know; the validator asks in the highest version both speak and the
   answer's signature names that version (see `response_signing_message`).
4: the states commitment declares the kernels that change a step's bits
   (`StatesCommitment.kernels`, e.g. the attention backend), so the validator recomputes
   with the miner's own choice; an audit fetches its states in as many requests as
   `MAX_STATES_PER_FETCH` needs. A validator that accepts them gets the answer's image
   and the fetched states as binary bodies (niche/wire.py: a length-prefixed JSON header,
   then the PNG bytes or the raw float32 states) instead of base64 inside JSON."""
MIN_PROTOCOL_VERSION = 2
"""The oldest version still spoken, so a subnet upgrades one peer at a time (CHANGELOG.md)."""
SUPPORTED_PROTOCOL_VERSIONS: tuple[int, ...] = tuple(
    range(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION + 1))


def negotiate(theirs: Iterable[int], ours: Iterable[int] = SUPPORTED_PROTOCOL_VERSIONS
              ) -> int | None:
    """The highest version both sides speak (None: no common version)."""
    common = set(theirs) & set(ours)
    return max(common) if common else None

GENERATE_PATH = "/v1/generate"
"""Signed POST: GenerateRequest -> GenerateResponse."""
INFO_PATH = "/v1/info"
"""Unsigned GET: InfoResponse (what a miner serves)."""
STATES_PATH = "/v1/states"
"""Signed POST: StatesRequest -> StatesResponse (states an answer committed to)."""

MAX_STATES = 200
"""Most denoising steps an answer can commit to (GenerationParams.steps' bound)."""
MAX_STATES_PER_FETCH = 8
"""States in one /v1/states answer: at most 8 x 4 MiB of float32 (the largest state,
MAX_STATE_ELEMENTS) plus base64, so one answer stays under the validator's byte cap; an
audit that needs more states (2 per random step, 14 for Kolors at 30 steps) sends several
requests."""
MAX_KERNEL_DECLARATIONS = 8
KERNEL_NAME_PATTERN = r"^[a-z][a-z0-9_.-]{0,31}$"
ATTENTION_BACKENDS = ("default", "math", "flash", "efficient", "cudnn")
"""`kernels["attention"]`: torch's scaled-dot-product attention backend the networks ran
(`default`: torch's own choice per device). Backends round differently, so the validator
recomputes with the declared one."""
MAX_STATE_ELEMENTS = 4 * 512 * 512
"""Float32 values in one state (4 MiB): FLUX's packed latent up to 2048x2048 (64 x 128^2
tokens: the default `Limits.max_size`; the shipped specs stop at 1536), Kolors' 4 x 512^2 up
to 4096x4096. A spec allowing FLUX above 2048 would need it raised: its answers'
commitments would be refused."""

MAX_PROMPT_CHARS = 2000
MAX_SEED = 2**32 - 1
MAX_IMAGE_B64_CHARS = 24 * 1024 * 1024


class PipelineKind(str, Enum):
    """How a model is asked to draw: from text alone, or with a conditioning image."""

    TXT2IMG = "txt2img"
    CONTROLNET_CANNY = "controlnet-canny"
    CONTROLNET_DEPTH = "controlnet-depth"
    IP_ADAPTER = "ip-adapter"

    @property
    def needs_image(self) -> bool:
        return self is not PipelineKind.TXT2IMG


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GenerationParams(_Strict):
    """Everything that decides the pixels. Same params + same model files = same image."""

    model: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9._-]*$")
    pipeline: PipelineKind = PipelineKind.TXT2IMG
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    seed: int = Field(ge=0, le=MAX_SEED)
    steps: int | None = Field(default=None, ge=1, le=200)
    guidance: float | None = Field(default=None, ge=0.0, le=30.0)
    width: int | None = Field(default=None, ge=16, le=4096)
    height: int | None = Field(default=None, ge=16, le=4096)
    controlnet_scale: float | None = Field(default=None, ge=0.0, le=4.0)
    ip_adapter_scale: float | None = Field(default=None, ge=0.0, le=4.0)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of params the engine has resolved (defaults filled in)."""
        if self.width is None or self.height is None:
            raise ValueError("unresolved params: width and height are only known after "
                             "engine.resolve")
        return self.width, self.height


class GenerateRequest(_Strict):
    """POST /v1/generate body. `image` is the conditioning image (base64 PNG/WebP/JPEG)."""

    protocol_version: int = PROTOCOL_VERSION
    request_id: str = Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    params: GenerationParams
    image: str | None = Field(default=None, max_length=MAX_IMAGE_B64_CHARS)
    timeout: float = Field(default=30.0, gt=0.0, le=600.0)


class StatesCommitment(_Strict):
    """What an answer commits to: the sha256 of each sampler state x_1..x_N (raw float32,
    little-endian, C order, of `shape`), and the dtype the miner's networks ran in. The
    validator picks which states to fetch only after the answer is in, so a miner cannot
    compute just the states that will be checked."""

    shape: list[int] = Field(min_length=1, max_length=6)
    """Each size at least 1, and at most MAX_STATE_ELEMENTS elements in all: a shape no
    state can have (a negative size, a product that overflows) would make every audit of
    the answer fail on the validator's side instead of the miner's."""
    sha256: list[str] = Field(min_length=1, max_length=MAX_STATES)
    compute_dtype: str = Field(pattern=r"^(float32|bfloat16|float16)$")
    kernels: dict[str, str] = Field(default_factory=dict, max_length=MAX_KERNEL_DECLARATIONS,
                                    exclude_if=lambda value: not value)
    """Protocol 4+: the kernel choices that change a step's bits (`attention`: one of
    ATTENTION_BACKENDS; `weights`: the weight storage, e.g. `gguf-q8`). Empty from a
    protocol-2/3 miner (the validator assumes the defaults). Covered by `digest`."""

    @field_validator("shape")
    @classmethod
    def _bounded_shape(cls, value: list[int]) -> list[int]:
        if any(size < 1 for size in value):
            raise ValueError(f"state shape {value} has a size below 1")
        if math.prod(value) > MAX_STATE_ELEMENTS:  # Python ints: no overflow
            raise ValueError(f"state shape {value} holds more than {MAX_STATE_ELEMENTS} "
                             "elements")
        return value

    @field_validator("kernels")
    @classmethod
    def _bounded_kernels(cls, value: dict[str, str]) -> dict[str, str]:
        for key, choice in value.items():
            # fullmatch: re.match's `$` also matches before a final newline
            if not re.fullmatch(KERNEL_NAME_PATTERN, key) or \
                    not re.fullmatch(KERNEL_NAME_PATTERN, choice):
                raise ValueError(f"kernel declaration {key!r}: {choice!r} is not a short "
                                 "lower-case name")
        attention = value.get("attention")
        if attention is not None and attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention backend {attention!r} is not one of "
                             f"{', '.join(ATTENTION_BACKENDS)}")
        return value

    def digest(self) -> str:
        """One hash over the whole commitment (what the answer signature covers). An empty
        `kernels` is left out, so a protocol-2/3 commitment hashes as it always did."""
        fields = self.model_dump(mode="json")  # an empty `kernels` is excluded
        return hashlib.sha256(_CANONICAL_JSON.encode(fields).encode()).hexdigest()


class GenerateResponse(_Strict):
    """The miner's answer. `signature` is the miner hotkey's sr25519 signature (hex) over
    `response_signing_message(request_id, sha256(image bytes), states.digest())`, binding
    image and sampler states to miner."""

    protocol_version: int = PROTOCOL_VERSION
    request_id: str
    model: str
    image: str = Field(max_length=MAX_IMAGE_B64_CHARS,
                       description="base64 of the lossless image: PNG or WebP, or RGB-ZSTD "
                       "(niche/rawimage.py) for a peer whose limits list it")
    image_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    miner_hotkey: str
    signature: str
    generation_seconds: float = Field(ge=0.0)
    queue_seconds: float = Field(default=0.0, ge=0.0)
    miner_version: str
    states: StatesCommitment | None = None
    """None: an answer that can only be checked by regenerating it (see the validator)."""

    def states_digest(self) -> str:
        return self.states.digest() if self.states is not None else NO_STATES


class StatesRequest(_Strict):
    """POST /v1/states body: which committed states of an earlier answer to send (1..N)."""

    protocol_version: int = PROTOCOL_VERSION
    request_id: str = Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    indices: list[int] = Field(min_length=1, max_length=MAX_STATES_PER_FETCH)


class StateBlob(_Strict):
    index: int = Field(ge=1, le=MAX_STATES)
    data: str = Field(max_length=(MAX_STATE_ELEMENTS * 4 * 4) // 3 + 8,
                      description="base64 of the raw float32 little-endian state")


class StatesResponse(_Strict):
    protocol_version: int = PROTOCOL_VERSION
    request_id: str
    states: list[StateBlob] = Field(max_length=MAX_STATES_PER_FETCH)


class ModelInfo(_Strict):
    model: str
    pipelines: list[PipelineKind]


class RuntimeInfo(_Strict):
    """The libraries and hardware a miner's pixels come from (niche.runtime): validators
    warn when a miner's differs from their own, since bits drift across versions."""

    torch: str
    diffusers: str
    transformers: str = ""
    cuda: str = "none"
    """torch's CUDA build version, "none" on a CPU build."""
    device: str = "cpu"
    gpu_name: str | None = None
    dtypes: dict[str, str] = Field(default_factory=dict)
    """The dtype each served model runs in."""


class InfoResponse(_Strict):
    """GET /v1/info: what this miner serves. Validators read it to pick challenges.

    Unknown fields are ignored (not refused) so a newer miner's info still reads."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    protocol_version: int = PROTOCOL_VERSION
    """The newest version the miner speaks."""
    protocol_versions: list[int] = Field(default_factory=list, max_length=32)
    """Every version it speaks (protocol 3+); empty from a protocol-2 miner."""
    hotkey: str
    models: list[ModelInfo]
    capacity_per_minute: float = Field(ge=0.0)
    miner_version: str
    runtime: RuntimeInfo | None = None

    def speaks(self) -> list[int]:
        """The versions the miner speaks (a protocol-2 miner names only its one)."""
        return sorted(set(self.protocol_versions)) or [self.protocol_version]
    concurrency: int = Field(default=1, ge=1, le=256)
    """Requests served at once (the miner's live engine replicas); validators send up to
    this many challenges at once and pay for the throughput delivered (docs/scoring.md)."""
    requests_per_minute: float | None = Field(default=None, ge=0.0, allow_inf_nan=False)
    """Generate requests a caller may send per minute (0: no limit; None: not said, an
    older miner); with `stake_proportional`, the budget of a caller holding all validator
    stake, shared by stake. A validator and its gateway (one hotkey) share it; the bucket
    holds `requests_per_minute / RATE_BURST_DIVISOR` of them."""
    stake_proportional: bool = False


RATE_BURST_DIVISOR = 6.0
"""A miner's token bucket holds its requests per minute / 6 (ten seconds of them, at least
one request): the miner enforces it (`RateLimiter`); validators and gateways mirror it to
stay within it."""


class ErrorResponse(BaseModel):
    """Every refusal has this body; `reason` is a stable machine-readable word."""

    reason: str
    detail: str = ""
    field: str | None = None
    """The request field at fault, when one is (e.g. "image", "params.width")."""

    @classmethod
    def read(cls, body: bytes) -> ErrorResponse | None:
        """A peer's error body, or None for any other bytes. pydantic's parser is bounded:
        `json.loads` of 3,000 `[` raises RecursionError, which would end the reader's own
        request as its failure instead of the sender's answer."""
        try:
            return cls.model_validate_json(body)
        except ValueError:  # pydantic's ValidationError too: not JSON, too deep, another shape
            return None


NO_STATES = "-"
"""The states digest signed by an answer that commits to no states."""


def response_signing_message(request_id: str, image_sha256: str,
                             states_digest: str = NO_STATES, *,
                             version: int = PROTOCOL_VERSION) -> bytes:
    """What a miner signs for each answer: nothing binds an image and its computation to
    its miner without it. The message names the protocol `version` the answer was asked
    in, so an answer signed under one version never verifies under another."""
    return (f"niche-response/v{version}:{request_id}:{image_sha256}:"
            f"{states_digest}").encode()


def first_validation_error(exc: ValidationError) -> tuple[str, str]:
    """(dotted location, message) of the first problem pydantic found, plus how many more:
    one line a caller can act on instead of pydantic's multi-line dump."""
    first = exc.errors()[0]
    where = one_line(".".join(str(part) for part in first.get("loc", ())))  # a peer's keys
    more = exc.error_count() - 1
    return where, one_line(str(first.get("msg", ""))) + (f" (+{more} more)" if more > 0
                                                         else "")
