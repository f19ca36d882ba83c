"""Bounds checked against the subnet's production settings, not the tiny defaults.

The gateway's default deadline against the largest request its catalog accepts: FLUX.1-dev
at 1536x1536 and 50 steps is ~4x the work of its 1024x1024, 28-step default (60 s timeout),
so a flat 60 s deadline cut off honest miners mid-generation and cooled them down."""
from __future__ import annotations

import pytest

from niche.gateway.service import RETRY_ROOM, default_deadline
from niche.models.spec import load_spec
from niche.protocol import GenerationParams


@pytest.mark.parametrize("model", ["flux-dev", "flux-schnell", "flux-mini", "kolors"])
def test_the_default_deadline_holds_the_largest_request_with_room_for_a_retry(model):
    spec = load_spec(model)
    d, limits = spec.defaults, spec.limits
    largest = GenerationParams(model=model, prompt="x", seed=1, width=limits.max_size,
                               height=limits.max_size, steps=limits.max_steps)
    work = (limits.max_size ** 2 * limits.max_steps) / (d.width * d.height * d.steps)
    deadline = default_deadline(spec, largest, floor=60.0)
    assert deadline >= RETRY_ROOM * d.timeout * work >= d.timeout * work
    default = GenerationParams(model=model, prompt="x", seed=1)
    assert default_deadline(spec, default, floor=60.0) == max(60.0, RETRY_ROOM * d.timeout)
    small = GenerationParams(model=model, prompt="x", seed=1, width=limits.min_size,
                             height=limits.min_size, steps=limits.min_steps)
    assert default_deadline(spec, small, floor=60.0) == max(60.0, RETRY_ROOM * d.timeout)


def test_flux_dev_at_its_largest_gets_minutes_not_the_flat_minute():
    spec = load_spec("flux-dev")
    largest = GenerationParams(model="flux-dev", prompt="x", seed=1, width=1536, height=1536,
                               steps=50)
    assert default_deadline(spec, largest, floor=60.0) > 400  # 2 x 60 s x 4.0
