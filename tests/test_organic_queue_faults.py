"""The organic audit queue is a side file between the gateway and the validator: when it is
locked by another process, corrupt or deleted, users still get their images at once, the
validator's rounds go on (its scores saved), and verdicts are written only after the round
that applied them is saved. Real miners, gateway, validator and SQLite files."""
from __future__ import annotations

import logging
import sqlite3
import threading
import time

import openai
import pytest
from gateway_support import NETUID, Only, make_chain, running_gateway, running_miners
from PIL import Image

from niche.imaging import encode_b64
from niche.protocol import GenerateRequest, GenerateResponse, GenerationParams
from niche.sqlite_files import ORGANIC_QUEUE_ID
from niche.validator.client import MinerClient, MinerTarget
from niche.validator.organic import OrganicQueue, QueueError
from niche.validator.scoring import ScoringConfig
from niche.validator.service import Validator, ValidatorConfig
from niche.validator.state import ValidatorState

SIGNER = "5validator"


def _row(request_id: str) -> tuple[MinerTarget, GenerateRequest, GenerateResponse]:
    request = GenerateRequest(request_id=request_id, params=GenerationParams(
        model="flux-schnell", prompt="x", seed=1, steps=4, width=64, height=64))
    image, sha = encode_b64(Image.new("RGB", (64, 64), (9, 9, 9)))
    answer = GenerateResponse(request_id=request_id, model="flux-schnell", image=image,
                              image_sha256=sha, miner_hotkey="5miner", signature="00",
                              generation_seconds=0.1, miner_version="t")
    return MinerTarget(1, "5miner", "http://127.0.0.1:1"), request, answer


def _statuses(path) -> list[str]:
    with sqlite3.connect(path) as db:
        return [s for (s,) in db.execute("SELECT status FROM organic ORDER BY id")]


def test_a_corrupt_queue_is_moved_aside_and_a_fresh_one_starts(tmp_path, caplog):
    path = tmp_path / "organic.sqlite"
    OrganicQueue(path, signer=SIGNER).close()
    # a queue whose pages are damaged past SQLite's 100-byte header
    garbage = path.read_bytes()[:100] + b"garbagegarbage!!" * 512
    path.write_bytes(garbage)
    caplog.set_level(logging.WARNING, logger="niche.validator")
    queue = OrganicQueue(path, signer=SIGNER)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("organic.sqlite.corrupt-")
             and not p.name.endswith(("-wal", "-shm"))]
    assert len(aside) == 1 and aside[0].read_bytes() == garbage  # kept, not deleted
    assert "is not a usable database" in caplog.text and aside[0].name in caplog.text
    assert queue.submit(*_row("after-corruption"), 0.1)
    assert _statuses(path) == ["pending"]
    # the other process opening it next finds the fresh queue, moves nothing
    OrganicQueue(path, signer=SIGNER).close()
    assert len([p for p in tmp_path.iterdir() if ".corrupt-" in p.name
                and not p.name.endswith(("-wal", "-shm"))]) == 1


def test_a_queue_deleted_while_open_is_reopened_by_both_sides(tmp_path, caplog):
    path = tmp_path / "organic.sqlite"
    gateway_side = OrganicQueue(path, signer=SIGNER)
    validator_side = OrganicQueue(path, signer=SIGNER)
    assert gateway_side.submit(*_row("before-deletion"), 0.1)
    for suffix in ("", "-wal", "-shm"):  # an operator cleaning up under running processes
        (tmp_path / f"organic.sqlite{suffix}").unlink(missing_ok=True)
    caplog.set_level(logging.WARNING, logger="niche.validator")
    assert gateway_side.submit(*_row("after-deletion"), 0.1)
    assert "was deleted while open: reopening it" in caplog.text
    claimed = validator_side.claim(10, 300.0)  # reads the file the gateway writes now
    assert [item.challenge.request_id for item in claimed] == ["after-deletion"]


def _hold_lock(path, seconds: float, held: threading.Event) -> threading.Thread:
    """Another process's write lock on the queue for `seconds` (an exclusive transaction)."""
    def hold() -> None:
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("BEGIN EXCLUSIVE")
        held.set()
        time.sleep(seconds)
        db.execute("ROLLBACK")
        db.close()

    thread = threading.Thread(target=hold)
    thread.start()
    assert held.wait(10)
    return thread


def _validator(net, tmp_path, queue_path, engine, state) -> Validator:
    config = ValidatorConfig(netuid=NETUID, models=("flux-schnell",), rounds=1, seed=5,
                             state_path=tmp_path / "v.sqlite", organic_queue=queue_path,
                             round_interval=0, audit_fraction=1.0,
                             scoring=ScoringConfig(model_shares={"flux-schnell": 1.0}))
    return Validator(config, net.chain, net.validator, engine, MinerClient(net.validator),
                     state)


@pytest.mark.slow
def test_a_locked_queue_holds_neither_the_user_nor_the_round(tmp_path, tiny_engine, tiny_root,
                                                             caplog):
    net = make_chain(tmp_path, miners=1)
    queue_path = net.root / "organic.sqlite"
    with running_miners(net, {"miner1": Only(tiny_engine, "flux-schnell")}), \
            running_gateway(net, tiny_root, models=("flux-schnell",), expect_miners=1) as gw:
        gw.gateway.audit_queue_wait = 1.0  # the default
        client = openai.OpenAI(api_key=gw.key, base_url=gw.base_url, max_retries=0)
        client.images.generate(model="flux-schnell", prompt="warm up", size="64x64")
        lock = _hold_lock(queue_path, 4.0, threading.Event())
        started = time.monotonic()
        client.images.generate(model="flux-schnell", prompt="while locked", size="64x64",
                               extra_body={"seed": 3})
        waited = time.monotonic() - started
        assert waited < 3.5, f"the user waited {waited:.1f}s on the audit queue's lock"
        lock.join()
        deadline = time.monotonic() + 15
        while len(_statuses(queue_path)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _statuses(queue_path) == ["pending", "pending"]  # written behind the answer

        caplog.set_level(logging.WARNING, logger="niche.validator")
        lock = _hold_lock(queue_path, 12.0, threading.Event())
        with ValidatorState(tmp_path / "v.sqlite") as state:
            validator = _validator(net, tmp_path, queue_path, tiny_engine, state)
            assert validator.run() == 0  # the round ran and was saved, organic skipped
            assert state.round_index == 1
        lock.join()
        assert "organic audits skipped this round" in caplog.text
        assert _statuses(queue_path) == ["pending", "pending"]
    net.chain.close()


@pytest.mark.slow
def test_organic_verdicts_are_written_after_the_round_is_saved(tmp_path, tiny_engine,
                                                               tiny_root):
    net = make_chain(tmp_path, miners=1)
    queue_path = net.root / "organic.sqlite"
    with running_miners(net, {"miner1": Only(tiny_engine, "flux-schnell")}), \
            running_gateway(net, tiny_root, models=("flux-schnell",), expect_miners=1) as gw:
        client = openai.OpenAI(api_key=gw.key, base_url=gw.base_url, max_retries=0)
        client.images.generate(model="flux-schnell", prompt="an organic pear", size="64x64")
        assert _statuses(queue_path) == ["pending"]
        with ValidatorState(tmp_path / "v.sqlite") as state:
            validator = _validator(net, tmp_path, queue_path, tiny_engine, state)

            def killed(*args, **kwargs):
                raise KeyboardInterrupt("killed while saving the round")

            saving, state.save_round = state.save_round, killed  # type: ignore[method-assign]
            with pytest.raises(KeyboardInterrupt):
                validator.run()
            # the verdict's penalty or credit was never saved: the row is not marked either
            assert _statuses(queue_path) == ["claimed"]
            state.save_round = saving  # type: ignore[method-assign]
        client.images.generate(model="flux-schnell", prompt="an organic plum", size="64x64")
        with ValidatorState(tmp_path / "v.sqlite") as state:
            assert _validator(net, tmp_path, queue_path, tiny_engine, state).run() == 0
        assert _statuses(queue_path) == ["claimed", "passed"]
    net.chain.close()


def _names(folder) -> list[str]:
    """The files in `folder` but SQLite's -wal/-shm (a read-only look at a WAL file makes
    them)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(("-wal", "-shm")))


def test_a_file_that_is_not_a_queue_is_refused_untouched(tmp_path):
    """A mistyped --gateway.organic_queue or --neuron.organic_queue wrote the queue's table
    into a validator's state file or the chain file, and moved a hotkey file aside."""
    from niche.chain.local import LocalChain

    hotkey = tmp_path / "hotkey-copy"
    hotkey.write_text('{"secretPhrase": "not a database", "ss58Address": "5abc"}')
    state = tmp_path / "state.sqlite"
    ValidatorState(state).close()
    chain = tmp_path / "chain.db"
    LocalChain(chain, create=True).close()
    other = tmp_path / "notes.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE notes (text TEXT)")
    for path, seems in ((hotkey, "is not a SQLite file"),
                        (state, "a niche validator state file"),
                        (chain, "a niche localnet chain file"),
                        (other, "another SQLite database (tables: notes)")):
        before = _names(tmp_path), path.read_bytes()
        with pytest.raises(QueueError) as refused:
            OrganicQueue(path, signer=SIGNER)
        message = str(refused.value)
        assert seems in message and "nothing was written" in message and "\n" not in message
        assert (_names(tmp_path), path.read_bytes()) == before  # nothing moved or written


def test_a_queue_from_before_the_mark_is_adopted(tmp_path):
    path = tmp_path / "organic.sqlite"
    queue = OrganicQueue(path, signer=SIGNER)
    assert queue.submit(*_row("kept-row-1"), 0.1)
    queue.close()
    with sqlite3.connect(path) as db:  # as a release before the mark wrote it
        db.execute("PRAGMA application_id=0")
    queue = OrganicQueue(path, signer=SIGNER)
    queue.close()
    assert _statuses(path) == ["pending"]
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA application_id").fetchone()[0] == ORGANIC_QUEUE_ID
