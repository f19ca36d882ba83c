"""The OpenAI Images API shapes the gateway speaks, plus niche's documented extensions.

Requests are strict (no "2" for 2, no unknown fields) and bounded, so a hostile client gets
a 400 naming the field instead of any work being done. OpenAI fields that change nothing
here (`quality`, `style`, `moderation`, `safety_identifier`) are accepted and ignored so
stock clients work unchanged.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from niche.protocol import MAX_IMAGE_B64_CHARS, MAX_PROMPT_CHARS, MAX_SEED, PipelineKind

MAX_N = 4

StrictInt = Annotated[int, Field(strict=True)]
StrictFloat = Annotated[float, Field(strict=True)]
StrictStr = Annotated[str, Field(strict=True)]
StrictBool = Annotated[bool, Field(strict=True)]


class ImagesRequest(BaseModel):
    """POST /v1/images/generations (JSON), and /edits and /variations (their form fields,
    typed by niche/gateway/forms.py, with the uploaded image as `image`)."""

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
    # OpenAI's output options
    output_format: Literal["png", "webp", "jpeg"] = "png"
    """Written here from the miner's checked pixels: png (lossless, the pixels `niche
    verify` checks, none of the miner's chunks), webp or jpeg."""
    output_compression: StrictInt | None = Field(default=None, ge=0, le=100)
    background: Literal["auto", "opaque"] | None = None
    moderation: StrictStr | None = Field(default=None, max_length=32)
    safety_identifier: StrictStr | None = Field(default=None, max_length=256)
    stream: StrictBool = False
    partial_images: StrictInt | None = Field(default=None, ge=0, le=3)
    input_fidelity: Literal["high", "low"] | None = None
    """Edits only: without `pipeline`, high keeps the image's edges (controlnet-canny) and
    low keeps its look (ip-adapter)."""

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """OpenAI types its optional fields "integer or null" etc.: an explicit null (what
        SDK wrappers send for an argument left as None) means the field's default."""
        if not isinstance(data, dict):
            return data
        return {name: value for name, value in data.items()
                if value is not None or name not in DEFAULTED}


DEFAULTED = frozenset(name for name, info in ImagesRequest.model_fields.items()
                      if not info.is_required() and info.default is not None)
"""Fields whose explicit null is dropped, so their default applies (n, response_format,
output_format, stream, negative_prompt, pipeline)."""


class ImageData(BaseModel):
    """One image. `seed`, `pipeline`, `miner_*`, `steps` and `seconds` are niche's
    extensions: with the request's prompt and size they are what `niche verify` needs to
    check the image."""

    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    seed: int
    pipeline: str
    steps: int
    width: int
    height: int
    miner_uid: int
    miner_hotkey: str
    seconds: float
    attempts: int


class TokenDetails(BaseModel):
    image_tokens: int = 0
    text_tokens: int = 0


class Usage(BaseModel):
    """OpenAI's usage block. niche charges images, not tokens: `images` (delivered) and
    `steps` (denoising steps run for them) are what was used; the token counts are 0."""

    images: int
    steps: int
    input_tokens: int = 0
    input_tokens_details: TokenDetails = Field(default_factory=TokenDetails)
    output_tokens: int = 0
    total_tokens: int = 0


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str = "png"
    size: str | None = None
    usage: Usage | None = None


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
