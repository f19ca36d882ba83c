"""The miner's port while its models load: audits of answers given before a restart.

A restart (an upgrade, pm2's auto-update, a crash) keeps the answers' states on disk, but
loading FLUX.1-dev and Kolors takes minutes on a GPU box, while a validator gives a miner
30 s to send the states of an answer it audits: a closed port for that long is charged as a
dodged audit (ten of them for an organic answer). So the listening socket is bound first and,
while the models load, a miner without an engine serves it: `POST /v1/states` from the disk
store as usual (signed, rate-limited), `/v1/generate` and `/v1/info` refused with 503
`loading`, `/healthz` not ok. Then the loaded miner takes over the same socket: connections
arriving in between wait in its backlog, none is refused.
"""
from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, NoReturn, cast

from niche.errors import ModelsLoading

if TYPE_CHECKING:
    from niche.miner.service import MinerConfig
    from niche.models.engine import ImageEngine

log = logging.getLogger("niche.miner")

LOADING = ("this miner is loading its models (minutes on a GPU box after a restart); its "
           "answers' states are served meanwhile; retry later")

STOP_SECONDS = 10.0
"""How long the stand-in server may take to finish the fetches it is sending."""


class LoadingEngine:
    """The engine contract of a miner whose models are not loaded yet: every generation
    and description is refused (ModelsLoading, a 503 `loading`)."""

    loading = True
    concurrency = 1

    def _refuse(self, *args: object, **kwargs: object) -> NoReturn:
        raise ModelsLoading(LOADING)

    resolve = check_image = spec = served = generate = generate_with_states = _refuse


@contextlib.contextmanager
def states_while_loading(sock: socket.socket, wallet, config: MinerConfig, chain
                         ) -> Iterator[None]:
    """Serve the disk store's states on `sock` (bound, listening) until the block ends;
    nothing when the states are kept in memory only (a restart lost them)."""
    if config.states_path is None:
        yield
        return
    from niche.miner.server import create_app, uvicorn_server
    from niche.miner.service import MinerService

    service = MinerService(cast("ImageEngine", LoadingEngine()), wallet, config, chain=chain)
    server = uvicorn_server(create_app(service, refresh_metagraph=False))
    listener = sock.dup()  # closed by the stand-in's shutdown; `sock` stays listening
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]},
                              name="niche-states-while-loading", daemon=True)
    thread.start()
    log.info("serving the answers' states kept on disk while the models load")
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(STOP_SECONDS)
        if thread.is_alive():  # a fetch still sending: cut it, the validator retries
            server.force_exit = True
            thread.join(STOP_SECONDS)
        listener.close()
        service.close()
