"""The OpenAI Images API shapes the gateway speaks, plus niche's documented extensions.

Requests are strict (no "2" for 2, no unknown fields) and bounded, so a hostile client gets
a 400 naming the field instead of any work being done. OpenAI fields that change nothing
here (`quality`, `style`) are accepted and ignored so stock clients work unchanged.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from niche.protocol import MAX_IMAGE_B64_CHARS, MAX_PROMPT_CHARS, MAX_SEED, PipelineKind

MAX_N = 4

StrictInt = Annotated[int, Field(strict=True)]
StrictFloat = Annotated[float, Field(strict=True)]
StrictStr = Annotated[str, Field(strict=True)]


class ImagesRequest(BaseModel):
    """POST /v1/images/generations."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: StrictStr | None = Field(default=None, max_length=64)
    prompt: StrictStr = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    n: StrictInt = Field(default=1, ge=1, le=MAX_N)
    size: StrictStr | None = Field(default=None, max_length=16)
    response_format: Literal["b64_json", "url"] = "b64_json"
    user: StrictStr | None = Field(default=None, max_length=256)
    quality: StrictStr | None = Field(default=None, max_length=32)
    style: StrictStr | None = Field(default=None, max_length=32)
    # niche extensions
    seed: StrictInt | None = Field(default=None, ge=0, le=MAX_SEED)
    steps: StrictInt | None = Field(default=None, ge=1, le=200)
    guidance: StrictFloat | None = Field(default=None, ge=0.0, le=30.0)
    negative_prompt: StrictStr = Field(default="", max_length=MAX_PROMPT_CHARS)
    pipeline: PipelineKind = PipelineKind.TXT2IMG
    image: StrictStr | None = Field(default=None, max_length=MAX_IMAGE_B64_CHARS)
    controlnet_scale: StrictFloat | None = Field(default=None, ge=0.0, le=4.0)
    ip_adapter_scale: StrictFloat | None = Field(default=None, ge=0.0, le=4.0)
    timeout: StrictFloat | None = Field(default=None, gt=0.0, le=600.0)
    """Seconds the client will wait; retries on other miners happen within it."""


class ImageData(BaseModel):
    """One image. `seed`, `miner_*`, `steps` and `seconds` are niche's extensions: with the
    request's prompt and size they are what `niche verify` needs to check the image."""

    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    seed: int
    steps: int
    width: int
    height: int
    miner_uid: int
    miner_hotkey: str
    seconds: float
    attempts: int


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "niche"
    miners: int
    """Miners serving the model right now (extension)."""
    sizes: str
    """Accepted sizes, e.g. "512..1536 step 16" (extension)."""
    pipelines: list[str]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
