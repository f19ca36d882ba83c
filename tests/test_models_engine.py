"""The engine on tiny checkpoints of the real architectures: every pipeline draws, the same
request gives the same bits, and every input that should matter does."""
from __future__ import annotations

import hashlib

import numpy as np
import PIL.Image
import pytest

from niche.devnet.pictures import shapes_picture as photo
from niche.imaging import encode_image as png_bytes
from niche.protocol import GenerationParams, PipelineKind

ALL = [("flux-schnell", "txt2img"), ("kolors", "txt2img"), ("kolors", "controlnet-canny"),
       ("kolors", "controlnet-depth"), ("kolors", "ip-adapter")]




def pixels(img: PIL.Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float64)


def req(model, pipeline="txt2img", **kw) -> GenerationParams:
    kw.setdefault("prompt", "a photo of a cat sitting on a red chair")
    kw.setdefault("seed", 7)
    return GenerationParams(model=model, pipeline=pipeline, **kw)


def cond(pipeline: str):
    return None if pipeline == "txt2img" else photo(1)


@pytest.mark.parametrize("model,pipeline", ALL)
def test_every_pipeline_draws_and_repeats_bit_identically(tiny_engine, model, pipeline):
    params = req(model, pipeline)
    first = tiny_engine.generate(params, cond(pipeline))
    again = tiny_engine.generate(params, cond(pipeline))
    assert first.size == (64, 64) and first.mode == "RGB"
    assert pixels(first).std() > 5.0, "a real image, not a flat fill"
    assert png_bytes(first) == png_bytes(again)


@pytest.mark.parametrize("model,pipeline", ALL)
def test_seed_and_prompt_change_the_image(tiny_engine, model, pipeline):
    base = pixels(tiny_engine.generate(req(model, pipeline), cond(pipeline)))
    other_seed = pixels(tiny_engine.generate(req(model, pipeline, seed=8), cond(pipeline)))
    other_prompt = pixels(tiny_engine.generate(
        req(model, pipeline, prompt="a dragon flying over a castle"), cond(pipeline)))
    assert np.abs(base - other_seed).mean() > 5.0
    assert np.abs(base - other_prompt).max() > 0


@pytest.mark.parametrize("pipeline", ["controlnet-canny", "controlnet-depth", "ip-adapter"])
def test_conditioning_image_changes_the_image(tiny_engine, pipeline):
    a = pixels(tiny_engine.generate(req("kolors", pipeline), photo(1)))
    b = pixels(tiny_engine.generate(req("kolors", pipeline), photo(2)))
    assert np.abs(a - b).mean() > 0.3


@pytest.mark.parametrize("pipeline,field", [("controlnet-canny", "controlnet_scale"),
                                            ("controlnet-depth", "controlnet_scale"),
                                            ("ip-adapter", "ip_adapter_scale")])
def test_scale_has_an_effect_and_zero_is_exactly_txt2img(tiny_engine, pipeline, field):
    plain = png_bytes(tiny_engine.generate(req("kolors")))
    zero = png_bytes(tiny_engine.generate(req("kolors", pipeline, **{field: 0.0}), photo(1)))
    low = pixels(tiny_engine.generate(req("kolors", pipeline, **{field: 0.3}), photo(1)))
    high = pixels(tiny_engine.generate(req("kolors", pipeline, **{field: 1.0}), photo(1)))
    assert zero == plain
    base = pixels(PIL.Image.open(__import__("io").BytesIO(plain)))
    assert np.abs(high - base).mean() > np.abs(low - base).mean() > 0.1


def test_adapters_leave_txt2img_untouched(tiny_engine):
    """The IP-Adapter rewires the shared UNet for its calls only."""
    before = png_bytes(tiny_engine.generate(req("kolors")))
    tiny_engine.generate(req("kolors", "ip-adapter", ip_adapter_scale=1.0), photo(3))
    tiny_engine.generate(req("kolors", "controlnet-canny"), photo(3))
    assert png_bytes(tiny_engine.generate(req("kolors"))) == before


def test_kolors_pipelines_share_one_set_of_weights(tiny_engine):
    from niche.devnet.footprint import pipeline_modules, unique_bytes

    fam = tiny_engine.family("kolors")
    pipes = fam.pipelines()
    assert set(pipes) == set(PipelineKind)
    base = pipes[PipelineKind.TXT2IMG]
    for pipe in pipes.values():
        for name in ("unet", "text_encoder", "vae"):
            mod = getattr(pipe, name)
            assert mod is getattr(base, name)
            first = next(mod.parameters())
            assert first.data_ptr() == next(getattr(base, name).parameters()).data_ptr()
    everything = [m for p in pipes.values() for m in pipeline_modules(p)]
    own = list(fam.own_modules().values())
    ratio = (unique_bytes(everything + own) - unique_bytes(own)) / unique_bytes(
        pipeline_modules(base))
    assert ratio == pytest.approx(1.0, abs=1e-9)


def test_batch_validates_all_and_unfused_equals_single(tiny_engine):
    items = [(req("flux-schnell", seed=s, prompt=p), None)
             for s, p in [(1, "a red house"), (2, "a blue boat"), (3, "a green tree")]]
    batch = tiny_engine.generate_batch(items)
    singles = [tiny_engine.generate(p) for p, _ in items]
    assert [png_bytes(i) for i in batch] == [png_bytes(i) for i in singles]
    fused = tiny_engine.generate_batch(items, fuse=True)
    assert len(fused) == 3 and all(i.size == (64, 64) for i in fused)
    # fused items follow their own seeds: each is close to its single run, not to another
    for k, img in enumerate(fused):
        d_own = np.abs(pixels(img) - pixels(singles[k])).mean()
        d_other = np.abs(pixels(img) - pixels(singles[(k + 1) % 3])).mean()
        assert d_own < 1.0 < d_other


def test_served_lists_models_and_pipelines(tiny_engine):
    served = {m.model: [p.value for p in m.pipelines] for m in tiny_engine.served()}
    assert served == {"flux-schnell": ["txt2img"],
                      "kolors": ["txt2img", "controlnet-canny", "controlnet-depth",
                                 "ip-adapter"]}
    spec = tiny_engine.spec("kolors")
    assert (spec.defaults.width, spec.defaults.steps) == (64, 8)


def test_resolve_fills_defaults(tiny_engine):
    full = tiny_engine.resolve(req("kolors", "controlnet-canny", negative_prompt="blurry"))
    assert (full.steps, full.guidance, full.width, full.height) == (8, 4.0, 64, 64)
    assert full.controlnet_scale == 0.8 and full.ip_adapter_scale is None
    assert full.negative_prompt == "blurry"
    flux = tiny_engine.resolve(req("flux-schnell", negative_prompt="blurry"))
    assert flux.negative_prompt == "" and flux.guidance == 0.0 and flux.steps == 4


def test_steps_and_size_are_honoured(tiny_engine):
    img = tiny_engine.generate(req("kolors", width=96, height=48, steps=3))
    assert img.size == (96, 48)
    a = png_bytes(tiny_engine.generate(req("flux-schnell", steps=2)))
    assert a != png_bytes(tiny_engine.generate(req("flux-schnell")))


def test_png_bytes_are_stable():
    img = photo(5)
    assert hashlib.sha256(png_bytes(img)).hexdigest() == hashlib.sha256(png_bytes(
        img.copy())).hexdigest()
    assert PIL.Image.open(__import__("io").BytesIO(png_bytes(img))).info == {}


@pytest.mark.slow
def test_sharing_shows_in_resident_memory(tiny_root):
    """Fresh processes (bench/engine.py workers): loading every Kolors pipeline adds, beyond
    the adapters' own weights, much less resident memory than three more unshared copies."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "engine.py"
    spec = importlib.util.spec_from_file_location("bench_engine", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    job = {"kind": "memory", "model": "kolors", "root": str(tiny_root), "device": "cpu"}
    from concurrent.futures import ThreadPoolExecutor

    jobs = [{**job, "pipelines": ["txt2img"]},
            {**job, "pipelines": [p.value for p in PipelineKind]},
            {"kind": "unshared", "root": str(tiny_root)}]
    with ThreadPoolExecutor(3) as pool:  # RSS is per process: running side by side is fine
        alone, together, unshared = pool.map(bench.run_worker, jobs)
    shared_extra = together["rss_loaded"] - together["weights_own"] - alone["rss_loaded"]
    unshared_extra = unshared["rss_loaded"] - alone["rss_loaded"]
    print(f"extra resident bytes: shared pipelines {shared_extra}, 3 unshared copies "
          f"{unshared_extra}")
    assert shared_extra < 0.75 * unshared_extra
