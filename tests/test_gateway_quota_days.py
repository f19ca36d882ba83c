"""Images are refunded to the day (UTC) they were charged to: a request charged at
23:59:59 and failing after midnight must not give the new day's quota extra images."""
from __future__ import annotations

import calendar

from niche.gateway.db import GatewayDB
from niche.gateway.keys import KeyStore


class Clock:
    def __init__(self, at: float) -> None:
        self.t = at

    def __call__(self) -> float:
        return self.t


def test_a_refund_after_midnight_goes_to_the_day_it_was_charged_to(tmp_path):
    midnight = float(calendar.timegm((2026, 12, 7, 0, 0, 0)))
    clock = Clock(midnight - 1.0)  # 23:59:59 the day before
    store = KeyStore(GatewayDB(tmp_path / "gateway.sqlite"), clock=clock)
    _, key = store.create("night", per_minute=60, per_day=4)
    late = store.charge_images(key, 4)
    clock.t = midnight + 5.0
    today = store.charge_images(key, 4)  # the new day's whole quota
    assert today.day != late.day
    store.refund(key, 4, day=late.day)  # the late request failed after midnight
    assert store.used_today(key.id) == 4  # the new day still used up
    assert store.quota(key).images_left == 0
    clock.t = midnight - 1.0
    assert store.used_today(key.id) == 0  # the day before got its images back
