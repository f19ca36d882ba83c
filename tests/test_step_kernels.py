"""Declared kernels (protocol 4), same-dtype recomputation and the audit verdicts that are
not fraud: what a miner declares is bounded and signed, what a validator cannot reproduce
earns nothing without excluding anyone, its own failures cost nobody anything, and the
thresholds an operator measured load from one file."""
from __future__ import annotations

import argparse
import hashlib
import json

import pytest
from pydantic import ValidationError

from niche.errors import ConfigError
from niche.miner.service import declared_kernels
from niche.protocol import StatesCommitment
from niche.validator import scoring
from niche.validator.audit import AuditResult
from niche.validator.scoring import Outcome, ScoreBook, ScoringConfig
from niche.validator.service import applied
from niche.validator.steps import DEFAULT_STEP_BANDS, StepThresholds

SHA = "ab" * 32


def commitment(**kw) -> StatesCommitment:
    return StatesCommitment(shape=[1, 4], sha256=[SHA], compute_dtype="bfloat16", **kw)


# ------------------------------------------------------------------ the wire
def test_kernels_are_bounded_and_signed():
    plain = commitment()
    assert "kernels" not in plain.model_dump_json()  # a protocol-3 peer reads it as before
    canonical = json.dumps({"compute_dtype": "bfloat16", "sha256": [SHA], "shape": [1, 4]},
                           sort_keys=True, separators=(",", ":"))
    assert plain.digest() == hashlib.sha256(canonical.encode()).hexdigest()
    math = commitment(kernels={"attention": "math"})
    assert math.digest() != plain.digest()  # the signature covers the declaration
    assert StatesCommitment.model_validate_json(math.model_dump_json()) == math
    for bad in ({"attention": "fastest"}, {"Attention": "math"}, {"x": "a b"},
                {"k" * 40: "v"}, {f"k{i}": "v" for i in range(9)}):
        with pytest.raises(ValidationError):
            commitment(kernels=bad)


def test_a_miner_declares_its_kernels_only_to_protocol_4(tiny_engine):
    assert declared_kernels(tiny_engine, "flux-schnell", 4) == {"attention": "default"}
    assert declared_kernels(tiny_engine, "flux-schnell", 3) == {}
    assert declared_kernels(object(), "flux-schnell", 4) == {}  # an engine without kernels


# ------------------------------------------------------------------ verdicts and scores
def test_verdicts_that_are_not_fraud_never_exclude():
    base = Outcome(uid=1, hotkey="h1", model="flux-dev", latency=1.0, timeout=10.0)
    cases = {
        "passed": AuditResult(True, 0.9),
        "failed": AuditResult(False, 0.0, "step check: step 3"),
        "unavailable": AuditResult(False, 0.0, "states: refused", unavailable=True),
        "unverifiable": AuditResult(False, 0.0, "cannot reproduce", unverifiable=True),
        "unaudited": AuditResult(False, 0.0, "validator error", unaudited=True),
    }
    outcomes = {name: applied(base, r) for name, r in cases.items()}
    assert {n: r.verdict for n, r in cases.items()} == {n: n for n in cases}
    assert outcomes["passed"].valid and outcomes["passed"].audit_passed
    assert outcomes["failed"].audit_passed is False
    assert outcomes["unverifiable"].status == scoring.UNVERIFIABLE
    assert outcomes["unaudited"].status == scoring.UNAUDITED
    for name in ("unavailable", "unverifiable", "unaudited"):
        assert not outcomes[name].valid and outcomes[name].audit_passed is None, name
    cfg = ScoringConfig(alpha=0.5, model_shares={"flux-dev": 1.0})
    scores = {}
    for name, outcome in outcomes.items():
        book = ScoreBook(cfg)
        book.uids[1] = scoring.UidScore(hotkey="h1", score=0.8)
        book.apply(7, [outcome], {1: 1.0 if name == "passed" else 0.0})
        scores[name] = book.scores()[1]
        assert book.is_excluded("h1", 8) == (name == "failed"), name
    assert scores["unaudited"] == 0.8  # the validator's own failure moves nothing
    assert scores["unverifiable"] == pytest.approx(0.4)  # a zero reward, no exclusion
    assert scores["passed"] > 0.8 and scores["failed"] == 0.0
    assert scores["unavailable"] < 0.8


# ------------------------------------------------------------------ operator's bands
def test_bands_load_from_one_file_and_bad_files_are_one_line(tmp_path):
    good = tmp_path / "bands.json"
    good.write_text(json.dumps({"bands": {"flux-dev": [
        {"upto": 0.5, "float32": 1e-4, "bfloat16": 2e-3, "float16": 5e-4},
        {"upto": 1.0, "float32": 2e-4, "bfloat16": 4e-3, "float16": 1e-3}]}}))
    t = StepThresholds.from_file(good)
    assert t.threshold("flux-dev", "txt2img", "bfloat16", 0, 28) == 2e-3
    assert t.threshold("flux-dev", "txt2img", "bfloat16", 27, 28) == 4e-3
    assert t.bands["kolors"] == DEFAULT_STEP_BANDS["kolors"]  # models not in the file stay
    bad = {
        "missing": None,
        "not json": "{",
        "negative": {"bands": {"kolors": [{"upto": 1.0, "float32": -1, "bfloat16": 1,
                                           "float16": 1}]}},
        "unknown field": {"bands": {"kolors": [{"upto": 1.0, "float32": 1e-3,
                                                "bfloat16": 1e-2, "float16": 1e-2,
                                                "int8": 1}]}},
        "no last band": {"bands": {"kolors": [{"upto": 0.5, "float32": 1e-3,
                                               "bfloat16": 1e-2, "float16": 1e-2}]}},
    }
    for name, content in bad.items():
        path = tmp_path / f"{name}.json"
        if content is not None:
            path.write_text(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(ConfigError) as info:
            StepThresholds.from_file(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value), name


def test_validator_flags_for_bands_and_dtypes(tmp_path, tiny_engine):
    from niche.cli import build_parser
    from niche.commands.validator import build_config, extra_dtypes

    bands = tmp_path / "bands.json"
    bands.write_text(json.dumps({"bands": {"kolors": [
        {"upto": 1.0, "float32": 1e-3, "bfloat16": 9e-3, "float16": 3e-3}]}}))
    args = build_parser().parse_args([
        "validator", "--netuid", "3", "--verify.step_bands", str(bands),
        "--verify.dtypes", "bfloat16", "float32", "bfloat16", "--models", "kolors"])
    cfg = build_config(args)
    assert cfg.step_thresholds.threshold("kolors", "txt2img", "float16", 0, 30) == 3e-3
    # the float32 engine already covers float32: only bfloat16 needs its own copy
    assert extra_dtypes(args, tiny_engine, ["kolors"]) == ["bfloat16"]
    assert extra_dtypes(argparse.Namespace(), tiny_engine, ["kolors"]) == []
    with pytest.raises(ConfigError):
        build_config(build_parser().parse_args([
            "validator", "--netuid", "3", "--verify.step_bands", str(tmp_path / "none")]))


# ------------------------------------------------------------------ every step count
def test_every_step_count_plans_an_audit_that_fits_the_fetch_bounds():
    """1..MAX_STATES steps: the plan catches a 5 % fake with probability >= 1/3 and its states
    go in requests the protocol accepts (before, N >= 11 built an invalid request)."""
    import math
    import random

    from niche.protocol import MAX_STATES, MAX_STATES_PER_FETCH, StatesRequest
    from niche.validator.audit import MIN_DETECTION, AuditConfig, Auditor, random_steps_needed
    from niche.validator.steps import states_needed

    auditor = Auditor(None, None, None, None, AuditConfig())  # type: ignore[arg-type]
    draw = random.Random(1)
    for n in range(1, MAX_STATES + 1):
        plan = auditor.plan(draw, n)
        assert plan[0] == 0 and len(plan) == 1 + min(random_steps_needed(n), n - 1)
        needed = states_needed(plan, n)
        assert needed[-1] == n and all(1 <= i <= n for i in needed)
        for start in range(0, len(needed), MAX_STATES_PER_FETCH):
            StatesRequest(request_id="planfits01",
                          indices=needed[start:start + MAX_STATES_PER_FETCH])
        if n > 1:
            faked = max(1, math.ceil(0.05 * n))
            k = len(plan) - 1
            missed = math.comb(n - 1 - faked, k) / math.comb(n - 1, k)
            assert 1 - missed >= MIN_DETECTION - 1e-12 or k == n - 1, n


def test_an_unusable_endpoint_is_unavailable_never_the_validators_fault(tmp_path):
    """A miner that answered, then published an endpoint nothing can reach or parse: its
    audit is 'unavailable' (what it costs is docs/scoring.md's), not an 'unaudited' answer
    that would cost it nothing."""
    import asyncio

    from niche.chain.wallets import create_wallet
    from niche.validator.client import MinerClient, MinerTarget

    wallet = create_wallet("validator", "hot", tmp_path)
    client = MinerClient(wallet)
    commitment = StatesCommitment(shape=[1, 4], sha256=[SHA] * 4, compute_dtype="float32")
    for url in ("http://[::1", "ftp://127.0.0.1:1", "http://127.0.0.1:1", None):
        fetch = asyncio.run(client.fetch_states(
            MinerTarget(1, wallet.hotkey.ss58_address, url), "endpoint01", commitment, [1, 2],
            timeout=1.2, retry_delay=0.2))
        assert fetch.unavailable and not fetch.validator_error and fetch.reason, url


def test_one_engines_declared_backend_never_leaks_into_anothers_call(tiny_root):
    """torch's SDPA switch is per process: two engines on two threads, one on math, one on
    the default backend, each still computes exactly what it computes alone."""
    import threading

    from niche.models.engine import Engine
    from niche.protocol import GenerationParams

    default = Engine(models=["flux-schnell"], model_root=tiny_root, dtype="bfloat16")
    math = Engine(models=["flux-schnell"], model_root=tiny_root, dtype="bfloat16",
                  attention="math")
    params = GenerationParams(model="flux-schnell", prompt="a red fox", seed=4)
    alone = {"default": default.generate_with_states(params)[1][-1],
             "math": math.generate_with_states(params)[1][-1]}
    assert not bool((alone["default"] == alone["math"]).all())  # the backends differ
    together: dict[str, list] = {"default": [], "math": []}

    def run(name, engine):
        for _ in range(4):
            together[name].append(engine.generate_with_states(params)[1][-1])

    threads = [threading.Thread(target=run, args=item)
               for item in (("default", default), ("math", math))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, states in together.items():
        assert all(bool((s == alone[name]).all()) for s in states), name


def test_states_are_converted_once_and_hashed_alike_in_parallel():
    """FLUX.1-dev's 28 states at 1024x1024 (28 MiB) take the parallel hash path; the digests
    are the serial ones and the store keeps the very bytes that were hashed."""
    import torch

    from niche.miner.state_store import StateStore
    from niche.states import commit_raw, state_bytes, states_bytes

    states = [torch.randn(1, 4096, 64, generator=torch.Generator().manual_seed(i))
              for i in range(28)]
    shape, raw = states_bytes(states)
    commitment = commit_raw(shape, raw, "bfloat16")
    assert commitment.shape == [1, 4096, 64]
    assert commitment.sha256 == [hashlib.sha256(state_bytes(s)).hexdigest() for s in states]
    store = StateStore()
    store.put_raw("5validator", "once-only", raw)
    assert list(store.get("5validator", "once-only") or ()) == raw
