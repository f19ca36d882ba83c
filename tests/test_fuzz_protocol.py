"""Property-based fuzzing of what a stranger can put on the wire: protocol models, images,
base64 and signatures.

Properties:
- arbitrary JSON-ish data fed to the wire models only ever raises pydantic's ValidationError;
- every valid model survives encode -> decode exactly (JSON and Python round trips);
- arbitrary text / bytes / mutated real images fed to imaging only ever raise InvalidRequest,
  and every image that does decode is RGB within the caps;
- lossless encodings round-trip pixels exactly and deterministically (same bytes, same sha256);
- signature checks on arbitrary input return a bool, never raise; request-header verification
  only ever raises AuthFailure.

Example counts are small (the suite runs on 2 busy cores); hypothesis' database is off so a
run is reproducible from its seed alone.
"""
from __future__ import annotations

import base64
import contextlib
import io
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydantic import ValidationError

from niche.auth import AuthFailure, RequestVerifier, sign_response, verify_response
from niche.chain.wallets import create_wallet
from niche.errors import InvalidRequest
from niche.imaging import (
    ImageLimits,
    b64_to_bytes,
    bytes_to_image,
    decode_image,
    encode_b64,
    encode_image,
    image_sha256,
    to_b64,
)
from niche.protocol import (
    MAX_PROMPT_CHARS,
    MAX_SEED,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    GenerationParams,
    InfoResponse,
    ModelInfo,
    PipelineKind,
    response_signing_message,
)

FUZZ = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
SMALL = settings(max_examples=25, deadline=None, database=None,
                 suppress_health_check=list(HealthCheck))

# ----------------------------------------------------------------------------- strategies
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**80, 2**80),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                           max_leaves=12)

model_names = st.from_regex(r"\A[a-z0-9][a-z0-9._-]{0,20}\Z")
request_ids = st.from_regex(r"\A[A-Za-z0-9_-]{8,64}\Z")
sha256s = st.from_regex(r"\A[0-9a-f]{64}\Z")
finite = dict(allow_nan=False, allow_infinity=False)

params_strategy = st.builds(
    GenerationParams,
    model=model_names,
    pipeline=st.sampled_from(list(PipelineKind)),
    prompt=st.text(min_size=1, max_size=60),
    negative_prompt=st.text(max_size=20),
    seed=st.integers(0, MAX_SEED),
    steps=st.none() | st.integers(1, 200),
    guidance=st.none() | st.floats(0.0, 30.0, **finite),
    width=st.none() | st.integers(16, 4096),
    height=st.none() | st.integers(16, 4096),
    controlnet_scale=st.none() | st.floats(0.0, 4.0, **finite),
    ip_adapter_scale=st.none() | st.floats(0.0, 4.0, **finite),
)
requests_strategy = st.builds(
    GenerateRequest, request_id=request_ids, params=params_strategy,
    image=st.none() | st.text(alphabet="ABCDEFGHabcdefgh0123456789+/=", max_size=40),
    timeout=st.floats(0.001, 600.0, **finite))
responses_strategy = st.builds(
    GenerateResponse, request_id=st.text(max_size=70), model=st.text(max_size=30),
    image=st.text(max_size=60), image_sha256=sha256s, miner_hotkey=st.text(max_size=50),
    signature=st.text(max_size=140), generation_seconds=st.floats(0.0, 1e9, **finite),
    queue_seconds=st.floats(0.0, 1e9, **finite), miner_version=st.text(max_size=20))


def _dict_of(model) -> dict:
    return json.loads(model.model_dump_json())


# ----------------------------------------------------------------------------- protocol
@FUZZ
@given(st.sampled_from([GenerationParams, GenerateRequest, GenerateResponse, InfoResponse,
                        ErrorResponse]), json_values)
def test_wire_models_only_raise_validation_error(model, data):
    parsed = []
    with contextlib.suppress(ValidationError):
        parsed.append(model.model_validate(data))
    with contextlib.suppress(ValidationError):
        parsed.append(model.model_validate_json(json.dumps(data, allow_nan=True)))
    for value in parsed:  # whatever is accepted survives its own wire form unchanged
        assert isinstance(value, model)
        assert model.model_validate_json(value.model_dump_json()) == value


@FUZZ
@given(requests_strategy, st.sampled_from(["protocol_version", "request_id", "params",
                                           "image", "timeout", "evil"]), json_values)
def test_mutated_request_fields_only_raise_validation_error(request, key, value):
    data = _dict_of(request)
    data[key] = value
    try:
        parsed = GenerateRequest.model_validate(data)
    except ValidationError:
        return
    # whatever got through is still inside every documented bound
    assert 8 <= len(parsed.request_id) <= 64 and 0 < parsed.timeout <= 600
    assert 0 <= parsed.params.seed <= MAX_SEED
    assert len(parsed.params.prompt) <= MAX_PROMPT_CHARS


@FUZZ
@given(requests_strategy)
def test_request_round_trip_is_exact(request):
    wire = request.model_dump_json(exclude_none=True)
    again = GenerateRequest.model_validate_json(wire)
    assert again == request
    assert again.model_dump_json(exclude_none=True) == wire
    assert GenerateRequest.model_validate(request.model_dump()) == request


@FUZZ
@given(responses_strategy)
def test_response_round_trip_is_exact(response):
    again = GenerateResponse.model_validate_json(response.model_dump_json())
    assert again == response


@SMALL
@given(st.text(max_size=40), st.lists(st.sampled_from(list(PipelineKind)), max_size=4),
       st.floats(0.0, 1e6, **finite))
def test_info_round_trip_is_exact(hotkey, pipelines, capacity):
    info = InfoResponse(hotkey=hotkey, models=[ModelInfo(model="m", pipelines=pipelines)],
                        capacity_per_minute=capacity, miner_version="1")
    assert InfoResponse.model_validate_json(info.model_dump_json()) == info


@FUZZ
@given(request_ids, sha256s, request_ids, sha256s)
def test_signing_message_is_injective_on_valid_ids(rid_a, sha_a, rid_b, sha_b):
    a = response_signing_message(rid_a, sha_a)
    assert a == response_signing_message(rid_a, sha_a)
    if (rid_a, sha_a) != (rid_b, sha_b):
        assert a != response_signing_message(rid_b, sha_b)


# ----------------------------------------------------------------------------- imaging
def _raw(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _sample_image(w: int = 12, h: int = 9) -> Image.Image:
    img = Image.new("RGB", (w, h))
    img.putdata([(x * 21 % 256, y * 29 % 256, (x * y) % 256) for y in range(h) for x in range(w)])
    return img


SEEDS = {
    "png": _raw(_sample_image(), "PNG"),
    "png-rgba": _raw(_sample_image().convert("RGBA"), "PNG"),
    "png-palette": _raw(_sample_image().convert("P"), "PNG"),
    "png-16bit": _raw(Image.new("I;16", (9, 7), 4000), "PNG"),
    "webp": _raw(_sample_image(), "WEBP", lossless=True),
    "jpeg": _raw(_sample_image(), "JPEG", quality=80),
}
LIMITS = ImageLimits(max_b64_chars=64 * 1024, max_bytes=48 * 1024, max_pixels=256 * 256,
                     max_side=256)


def _check_decoded(image: Image.Image) -> None:
    assert image.mode == "RGB"
    assert 1 <= image.width <= LIMITS.max_side and 1 <= image.height <= LIMITS.max_side


mutations = st.tuples(
    st.sampled_from(sorted(SEEDS)),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    st.none() | st.integers(0, 10_000),  # truncate here
    st.binary(max_size=16),  # appended junk
)


def _mutate(seed: str, edits, cut, tail) -> bytes:
    data = bytearray(SEEDS[seed])
    for index, value in edits:
        data[index % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    return bytes(data) + tail


@FUZZ
@given(st.one_of(st.binary(max_size=300), mutations.map(lambda m: _mutate(*m))))
def test_any_bytes_decode_to_rgb_or_invalid_request(data):
    try:
        _check_decoded(bytes_to_image(data, limits=LIMITS))
    except InvalidRequest as exc:
        assert exc.field == "image"


@FUZZ
@given(st.one_of(
    st.text(max_size=80),
    st.binary(max_size=120).map(lambda b: base64.b64encode(b).decode()),
    mutations.map(lambda m: base64.b64encode(_mutate(*m)).decode()),
    st.binary(max_size=60).map(lambda b: base64.urlsafe_b64encode(b).decode() + "\n"),
))
def test_any_text_decodes_or_raises_invalid_request(text):
    try:
        _check_decoded(decode_image(text, field="params.image", limits=LIMITS))
    except InvalidRequest as exc:
        assert exc.field == "params.image"


@FUZZ
@given(st.binary(max_size=400))
def test_base64_round_trip_is_exact(data):
    if not data:
        with pytest.raises(InvalidRequest):
            b64_to_bytes(to_b64(data))
        return
    assert b64_to_bytes(to_b64(data)) == data


@SMALL
@given(st.integers(1, 24), st.integers(1, 24), st.sampled_from(["PNG", "WEBP"]), st.data())
def test_lossless_encode_decode_is_exact_and_deterministic(w, h, fmt, data):
    pixels = data.draw(st.binary(min_size=w * h * 3, max_size=w * h * 3))
    image = Image.frombytes("RGB", (w, h), pixels)
    encoded = encode_image(image, fmt)
    assert encode_image(image, fmt) == encoded  # deterministic bytes
    text, digest = encode_b64(image, fmt)
    assert digest == image_sha256(encoded) and base64.b64decode(text) == encoded
    decoded = decode_image(text)
    assert decoded.size == (w, h) and decoded.tobytes() == image.tobytes()


# ----------------------------------------------------------------------------- signatures
@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzzkeys")
    return create_wallet("m", "hot", root), create_wallet("v", "hot", root)


def test_signature_checks_never_raise(keys):
    miner, other = keys
    hotkey = miner.hotkey.ss58_address
    good = sign_response(miner.hotkey, "req-0000001", "a" * 64)

    @FUZZ
    @given(st.one_of(st.text(max_size=140), st.just(good), st.binary(max_size=70).map(
        lambda b: "0x" + b.hex())), st.text(max_size=70), st.text(max_size=70),
        st.sampled_from([hotkey, other.hotkey.ss58_address, "", "not-an-ss58"]))
    def check(signature, rid, sha, who):
        ok = verify_response(who, rid, sha, signature)
        assert isinstance(ok, bool)
        if ok:  # only the miner's own signature over exactly this message verifies
            assert (who, rid, sha, signature) == (hotkey, "req-0000001", "a" * 64, good)

    check()
    assert verify_response(hotkey, "req-0000001", "a" * 64, good)


def test_request_verification_only_raises_auth_failure(keys):
    miner, caller = keys
    verifier = RequestVerifier(miner.hotkey.ss58_address)
    header_names = ["X-Bittensor-Version", "X-Bittensor-Hotkey", "X-Bittensor-Nonce",
                    "X-Bittensor-Signature", "X-Bittensor-Receiver", "X-Bittensor-Crypto",
                    "Content-Type"]
    values = st.one_of(st.text(max_size=70), st.just(caller.hotkey.ss58_address),
                       st.just(miner.hotkey.ss58_address), st.just("1"),
                       st.integers(0, 2**70).map(str), st.just("sr25519"))

    @FUZZ
    @given(st.dictionaries(st.sampled_from(header_names), values, max_size=7),
           st.binary(max_size=64))
    def check(headers, body):
        with pytest.raises(AuthFailure) as info:
            verifier.verify(headers, body, method="POST", path="/v1/generate")
        assert info.value.status in (401, 403, 503)

    check()
