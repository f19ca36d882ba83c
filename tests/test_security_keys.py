"""Key handling: a running neuron holds its HOTKEY only. The coldkey (which owns the stake and
can move funds) never has to be on the serving machine: both neurons load their wallet with
`load_wallet(need_coldkey=False)`, and every chain action they take is signed by the hotkey.

Here the coldkey's private file is deleted after registration (only coldkeypub.txt stays, as
an operator should leave it), and a miner still publishes its endpoint and answers a signed
request, and a validator still sets weights, on a real LocalChain file.
"""
from __future__ import annotations

import asyncio
import os

from miner_support import NETUID, StubEngine, make_request

from niche.chain.local import LocalChain
from niche.chain.wallets import create_wallet, load_wallet
from niche.devnet.servers import BackgroundServer
from niche.miner.server import create_app
from niche.miner.service import MinerConfig, MinerService
from niche.validator.client import MinerClient, QueryStatus


def _hot_only(name: str, root):
    """Create, then remove the private coldkey file: what remains is what a server holds."""
    wallet = create_wallet(name, "hot", root)
    os.remove(wallet.coldkey_file.path)
    assert not wallet.coldkey_file.exists_on_device()
    assert wallet.coldkeypub_file.exists_on_device() and wallet.hotkey_file.exists_on_device()
    return load_wallet(name, "hot", root, interactive=False)  # what the neurons call


def test_neurons_run_without_the_coldkey_private_key(tmp_path):
    wallets = tmp_path / "wallets"
    chain = LocalChain(tmp_path / "chain.db", create=True)
    chain.create_subnet(NETUID, weights_rate_limit=0)
    # registration on localnet happens before the coldkey is taken off the machine
    for name, stake in (("miner", 0.0), ("validator", 50.0)):
        chain.register(NETUID, create_wallet(name, "hot", wallets), stake=stake)
    miner_wallet, validator_wallet = _hot_only("miner", wallets), _hot_only("validator", wallets)

    service = MinerService(StubEngine(), miner_wallet, MinerConfig(
        netuid=NETUID, requests_per_minute=0), chain=chain)
    with BackgroundServer(create_app(service, refresh_metagraph=False)) as server:
        service.announce("127.0.0.1", server.port)  # signed by the hotkey
        endpoint = chain.metagraph(NETUID).by_hotkey(service.hotkey).endpoint
        assert endpoint is not None and endpoint.port == server.port
        result = asyncio.run(MinerClient(validator_wallet).query(
            (0, service.hotkey, endpoint.url), make_request()))
        assert result.status is QueryStatus.OK, result.reason
    service.close()
    miner_uid = chain.metagraph(NETUID).by_hotkey(service.hotkey).uid
    weights = chain.set_weights(NETUID, validator_wallet, [miner_uid], [1.0], version_key=0)
    assert weights.success, weights.message
    chain.close()
