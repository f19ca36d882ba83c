"""The real audit loop around a claimed chain: a miner on 127.0.0.1 answers with the chain
(and the image its last state decodes to, as a cheater would send), and the validator's real
client and Auditor audit it, fetch included (signed, chunked /v1/states, hashes checked).
bench/adversary.py --live uses it to check its computed catch probabilities end to end."""
from __future__ import annotations

import asyncio
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from niche.chain.local import LocalChain
from niche.chain.wallets import create_wallet
from niche.devnet.servers import BackgroundServer
from niche.miner.server import create_app
from niche.miner.service import MinerConfig, MinerService
from niche.models.engine import Engine
from niche.protocol import GenerateRequest, GenerationParams
from niche.validator.audit import AuditConfig, Auditor
from niche.validator.challenges import Challenge
from niche.validator.client import MinerClient, MinerTarget
from niche.validator.steps import StepChecker
from niche.validator.verify import Verifier

NETUID = 1


class ClaimedChain:
    """A miner engine that answers every request with one preset chain x_1..x_N."""

    def __init__(self, engine: Engine):
        self._engine = engine
        self.chain: dict[int, torch.Tensor] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def generate_with_states(self, params: GenerationParams, image=None):
        states = [self.chain[i] for i in sorted(self.chain)]
        return self._engine.decode_state(params, states[-1]), states


class LiveAudit:
    """One miner serving `ClaimedChain`, one validator client and Auditor, on a local chain
    in a temporary folder (kept for the process's life)."""

    def __init__(self, root: Path, model: str, dtype: str):
        self.engine = Engine(models=[model], model_root=root, dtype=dtype, num_threads=1)
        self.claimed = ClaimedChain(self.engine)
        self._dir = tempfile.TemporaryDirectory(prefix="niche-live-audit-")
        folder = Path(self._dir.name)
        miner = create_wallet("miner", "hot", folder / "wallets")
        validator = create_wallet("validator", "hot", folder / "wallets")
        self.chain = LocalChain(folder / "chain.db", create=True)
        self.chain.create_subnet(NETUID)
        self.chain.register(NETUID, validator, stake=100.0)
        self.chain.register(NETUID, miner)
        self.service = MinerService(self.claimed, miner, MinerConfig(
            netuid=NETUID, requests_per_minute=0), chain=self.chain)
        self.server = BackgroundServer(create_app(self.service, refresh_metagraph=False)).start()
        self.target = MinerTarget(1, miner.hotkey.ss58_address,
                                  f"http://127.0.0.1:{self.server.port}")
        self.client = MinerClient(validator)
        self.auditor = Auditor(self.engine, Verifier(self.engine), StepChecker(self.engine),
                               self.client, AuditConfig())

    def catch_rate(self, params: GenerationParams, image, chain: dict[int, torch.Tensor],
                   audits: int, seed: int = 0) -> float:
        """The share of `audits` real audits (each a fresh answer and a fresh draw of steps)
        that fail the claimed chain."""
        self.claimed.chain = chain
        full = self.engine.resolve(params)
        rng = np.random.default_rng(seed)
        caught = 0
        for _ in range(audits):
            request = GenerateRequest(request_id=uuid.uuid4().hex[:16], params=full,
                                      timeout=300.0)
            result = asyncio.run(self.client.query(self.target, request))
            if not result.ok:
                raise RuntimeError(f"the live miner did not answer: {result.reason}")
            challenge = Challenge(uid=1, hotkey=self.target.hotkey,
                                  request_id=request.request_id, params=full, timeout=300.0,
                                  image=image)
            verdict, = asyncio.run(self.auditor.audit([(challenge, result, self.target)], rng))
            caught += not verdict.passed
        return caught / audits

    def close(self) -> None:
        self.server.stop()
        self.service.close()
        self.chain.close()
        self._dir.cleanup()
