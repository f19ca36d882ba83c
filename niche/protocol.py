"""Wire format between validators and miners ("synapses"), versioned.

Every model here is what crosses the network, so every field is bounded: a miner validates a
request before any model runs, and a validator validates an answer before scoring it.
"""
from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, ValidationError

PROTOCOL_VERSION = 1
"""Bumped on any incompatible change; a peer speaking another version is refused."""

GENERATE_PATH = "/v1/generate"
"""Signed POST: GenerateRequest -> GenerateResponse."""
INFO_PATH = "/v1/info"
"""Unsigned GET: InfoResponse (what a miner serves)."""

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


class GenerateResponse(_Strict):
    """The miner's answer. `signature` is the miner hotkey's sr25519 signature (hex) over
    `response_signing_message(request_id, sha256(image bytes))`, binding image to miner."""

    protocol_version: int = PROTOCOL_VERSION
    request_id: str
    model: str
    image: str = Field(max_length=MAX_IMAGE_B64_CHARS, description="base64 lossless PNG or WebP")
    image_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    miner_hotkey: str
    signature: str
    generation_seconds: float = Field(ge=0.0)
    queue_seconds: float = Field(default=0.0, ge=0.0)
    miner_version: str


class ModelInfo(_Strict):
    model: str
    pipelines: list[PipelineKind]


class InfoResponse(_Strict):
    """GET /v1/info: what this miner serves. Validators read it to pick challenges."""

    protocol_version: int = PROTOCOL_VERSION
    hotkey: str
    models: list[ModelInfo]
    capacity_per_minute: float = Field(ge=0.0)
    miner_version: str


class ErrorResponse(BaseModel):
    """Every refusal has this body; `reason` is a stable machine-readable word."""

    reason: str
    detail: str = ""
    field: str | None = None
    """The request field at fault, when one is (e.g. "image", "params.width")."""


def response_signing_message(request_id: str, image_sha256: str) -> bytes:
    """What a miner signs for each answer: nothing binds an image to its miner without it."""
    return f"niche-response/v{PROTOCOL_VERSION}:{request_id}:{image_sha256}".encode()


def first_validation_error(exc: ValidationError) -> tuple[str, str]:
    """(dotted location, message) of the first problem pydantic found, plus how many more:
    one line a caller can act on instead of pydantic's multi-line dump."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ()))
    more = exc.error_count() - 1
    return where, str(first.get("msg", "")) + (f" (+{more} more)" if more > 0 else "")
