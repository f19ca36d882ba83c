"""With --limits.stake_proportional every per-caller limit of a miner scales with the
caller's stake: a validator with 10x the stake gets about 10x the request rate and may hold
its stake share of the in-flight slots from one address (never fewer than the base cap)."""
from __future__ import annotations

import pytest
from miner_support import (
    StubEngine,
    make_request,
    module_net,
    running_miner,
    signed_post,
)

from niche.miner.limits import inflight_cap


def test_inflight_cap_scales_with_the_stake_share():
    assert inflight_cap(8, 48, None) == 8  # fixed limits
    assert inflight_cap(8, 48, 0.5) == 24
    assert inflight_cap(8, 48, 0.01) == 8  # never below the base cap
    assert inflight_cap(8, 48, 1.0) == 48
    assert inflight_cap(0, 48, 0.5) == 0  # no per-address bound stays none


net = module_net("stakenet")


def test_ten_times_the_stake_gets_ten_times_the_budget(net):
    # hi holds 100 of the validators' 162 stake, lo 10: ten times less
    with running_miner(net, StubEngine(), requests_per_minute=60,
                       stake_proportional_rate=True) as m:
        service = m.service
        hi, lo = (net.wallets[n].hotkey.ss58_address for n in ("hi", "lo"))
        rate = {k: service.limiter.rate_for(service.stake_share(service._neurons[k]))
                for k in (hi, lo)}
        assert rate[hi] == pytest.approx(10 * rate[lo])
        assert service.inflight_cap(hi) == 30 and service.inflight_cap(lo) == 8
        served = {}
        for name in ("hi", "lo"):  # the burst each bucket allows at once: rate / 6
            codes = [signed_post(m, net.wallets[name], make_request().model_dump_json(
                exclude_none=True).encode()).status_code for _ in range(8)]
            served[name] = codes.count(200)
            assert set(codes) <= {200, 429}
        assert served == {"hi": 6, "lo": 1}
    with running_miner(net, StubEngine(), requests_per_minute=60) as m:
        assert m.service.inflight_cap(hi) == m.service.inflight_cap(lo) == 8  # fixed
