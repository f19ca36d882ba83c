"""The gateway's directory of miners against real miner servers on 127.0.0.1: a miner whose
/v1/info blips keeps its users for a grace period (an honest miner on a busy box is not
dropped for one slow answer), a refusal or a moved endpoint drops it at once, a slow
refresh never installs an older view over a newer one, and an image whose only miner hangs
is taken by a miner the directory lists again mid-request."""
from __future__ import annotations

import asyncio
import logging
import threading
import time

import openai
from gateway_support import Gate, Only, make_chain, running_gateway, running_miners

from niche.gateway.directory import INFO_GRACE, MinerDirectory
from niche.validator.client import MinerClient


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _directory(net, clock: Clock, **kwargs) -> MinerDirectory:
    return MinerDirectory(net.chain, 1, MinerClient(net.validator),
                          own_hotkey=net.validator_hotkey, clock=clock, **kwargs)


def _listed(directory: MinerDirectory) -> set[int]:
    return {c.target.uid for c in directory.candidates}


def _failing_info(service, exc: Exception):
    real = service.info

    def info():
        raise exc

    service.info = info
    return real


def test_an_info_blip_keeps_the_miner_listed_for_the_grace_then_drops_it(
        tmp_path, tiny_engine, caplog):
    net = make_chain(tmp_path, miners=2)
    clock = Clock()
    with running_miners(net, {"miner1": Only(tiny_engine, "flux-schnell"),
                              "miner2": Only(tiny_engine, "flux-schnell")}) as miners:
        directory = _directory(net, clock, info_timeout=5.0)
        caplog.set_level(logging.INFO, logger="niche.gateway")
        asyncio.run(directory.refresh())
        both = {net.uids["miner1"], net.uids["miner2"]}
        assert _listed(directory) == both
        assert "directory: 2 miners serve (flux-schnell: 2)" in caplog.text

        real = _failing_info(miners["miner1"].service, RuntimeError("replica RPC lost"))
        clock.now += 30.0
        asyncio.run(directory.refresh())  # HTTP 500: availability, the last view holds
        assert _listed(directory) == both
        assert f"miner uid {net.uids['miner1']}: /v1/info failed (http_error: HTTP 500)" \
            in caplog.text

        clock.now += INFO_GRACE  # its last good view is now older than the grace
        caplog.clear()
        asyncio.run(directory.refresh())
        assert _listed(directory) == {net.uids["miner2"]}
        assert (f"directory: uid {net.uids['miner1']} left the routing view "
                "(/v1/info: http_error: HTTP 500)") in caplog.text

        miners["miner1"].service.info = real
        caplog.clear()
        asyncio.run(directory.refresh())
        assert _listed(directory) == both
        assert f"directory: uid {net.uids['miner1']} joined (flux-schnell)" in caplog.text


def test_a_timeout_is_graced_but_a_wrong_answer_or_a_moved_endpoint_is_not(
        tmp_path, tiny_engine, caplog):
    net = make_chain(tmp_path, miners=2)
    clock = Clock()
    with running_miners(net, {"miner1": Only(tiny_engine, "flux-schnell"),
                              "miner2": Only(tiny_engine, "flux-schnell")}) as miners:
        directory = _directory(net, clock, info_timeout=1.0)
        asyncio.run(directory.refresh())
        one, two = net.uids["miner1"], net.uids["miner2"]
        service = miners["miner1"].service
        real = service.info

        service.info = lambda: (time.sleep(2.0), real())[1]  # past the info timeout
        asyncio.run(directory.refresh())
        assert _listed(directory) == {one, two}

        # an answer for another hotkey is the miner's word, not a blip: dropped at once
        other = miners["miner2"].service.info()
        service.info = lambda: other
        caplog.set_level(logging.INFO, logger="niche.gateway")
        asyncio.run(directory.refresh())
        assert _listed(directory) == {two}
        assert f"directory: uid {one} left the routing view (/v1/info: wrong_hotkey" \
            in caplog.text

        service.info = real
        asyncio.run(directory.refresh())
        assert _listed(directory) == {one, two}
        # the miner moves its endpoint to a port where nothing listens: the old view is not
        # carried to a new address
        service.announce("127.0.0.1", 9)
        asyncio.run(directory.refresh())
        assert _listed(directory) == {two}


def test_a_slow_refresh_never_installs_an_older_view(tmp_path, tiny_engine):
    net = make_chain(tmp_path, miners=2)
    clock = Clock()
    with running_miners(net, {"miner1": Only(tiny_engine, "flux-schnell"),
                              "miner2": Only(tiny_engine, "flux-schnell")}) as miners:
        directory = _directory(net, clock, info_timeout=2.0)
        service = miners["miner2"].service
        real, calls = service.info, []

        def first_call_hangs():
            calls.append(1)
            if len(calls) == 1:
                time.sleep(3.0)
            return real()

        service.info = first_call_hangs

        async def both() -> None:
            first = asyncio.create_task(directory.refresh())  # miner2's info times out
            while not calls:
                await asyncio.sleep(0.01)
            await directory.refresh()  # started later, sees both, installs first
            assert len(directory.candidates) == 2
            await first  # ends last with one miner: an older world, dropped

        asyncio.run(both())
        assert _listed(directory) == {net.uids["miner1"], net.uids["miner2"]}


def test_a_hung_image_is_taken_by_a_miner_listed_again_mid_request(tmp_path, tiny_engine,
                                                                   tiny_root):
    net = make_chain(tmp_path, miners=2)
    hung = Gate(tiny_engine, "flux-schnell")
    back = Only(tiny_engine, "flux-schnell")
    try:
        with running_miners(net, {"miner1": hung, "miner2": back}) as miners, \
                running_gateway(net, tiny_root, models=("flux-schnell",), hedge_after=0.5,
                                expect_miners=2) as gw:
            directory = gw.gateway.directory
            directory.info_grace = 0.0  # miner2's refused info drops it at once
            real = _failing_info(miners["miner2"].service, RuntimeError("restarting"))
            asyncio.run(directory.refresh())
            assert _listed(directory) == {net.uids["miner1"]}
            client = openai.OpenAI(api_key=gw.key, base_url=gw.base_url, max_retries=0)
            answers: list = []
            request = threading.Thread(target=lambda: answers.append(
                client.images.generate(model="flux-schnell", prompt="back again",
                                       extra_body={"timeout": 30.0})))
            request.start()
            assert hung.waiting.wait(20), "the hung miner was never asked"
            time.sleep(1.0)  # the hedge is overdue and nobody else is listed
            miners["miner2"].service.info = real
            asyncio.run(directory.refresh())
            request.join(25)
            assert answers, "the image waited for its deadline"
            item = answers[0].data[0]
            assert item.miner_uid == net.uids["miner2"] and item.attempts == 2
    finally:
        hung.open.set()
    net.chain.close()
