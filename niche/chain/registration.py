"""Watching one's own registration: a hotkey replaced on its subnet must stop, loudly.

On a full subnet a new registration replaces the non-immune neuron with the lowest
pruning score; the replaced miner or validator earns nothing from then on. Both neurons
check their registration on every metagraph refresh: deregistered -> one ERROR line,
/healthz not ok, and (unless told to keep running) a stop with DEREGISTERED_EXIT_CODE,
which the pm2 files list in `stop_exit_codes` so pm2 does not restart it in a loop.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from niche.chain.base import DEREGISTERED_EXIT_CODE, Metagraph, Neuron, NotRegisteredError

__all__ = ["DEREGISTERED_EXIT_CODE", "RegistrationWatch", "require_permit", "permit_problem"]


def permit_problem(neuron: Neuron, netuid: int) -> str | None:
    """Why `neuron` cannot validate (None: it holds a validator permit)."""
    if neuron.validator_permit:
        return None
    return (f"validator hotkey {neuron.hotkey} (uid {neuron.uid}, stake {neuron.stake:g}) has "
            f"no validator permit on subnet {netuid}: miners refuse its requests (403) and "
            "the chain its weights. Stake more (permits go to the top hotkeys by stake, "
            "`btcli stake add`; `niche chain register --stake` on localnet), or start with "
            "--wait-for-permit to wait for one")


def require_permit(neuron: Neuron, netuid: int) -> None:
    """NotRegisteredError (exit code 3) for a validator without a permit."""
    problem = permit_problem(neuron, netuid)
    if problem is not None:
        raise NotRegisteredError(problem)


@dataclass
class RegistrationWatch:
    """Remembers which uid `hotkey` held and notices when it no longer does."""

    hotkey: str
    netuid: int
    role: str
    """'miner' or 'validator', for the log line."""
    uid: int | None = None
    reason: str | None = None
    """Why this neuron counts as deregistered (None while registered)."""

    @property
    def deregistered(self) -> bool:
        return self.reason is not None

    def check(self, metagraph: Metagraph, log: logging.Logger) -> str | None:
        """Look at a fresh metagraph; returns (and logs once, at ERROR) the reason when
        the hotkey lost its uid. A hotkey never seen registered is left to the start-up
        check (Metagraph.require)."""
        neuron = metagraph.by_hotkey(self.hotkey)
        if neuron is not None and (self.uid is None or neuron.uid == self.uid):
            self.uid = neuron.uid
            return None
        if self.uid is None:
            return None
        holder = metagraph.by_uid(self.uid)
        now = f"uid {self.uid} now belongs to {holder.hotkey}" if holder else \
            f"uid {self.uid} is empty"
        reason = (f"{self.role} hotkey {self.hotkey} was deregistered from subnet "
                  f"{self.netuid} at block {metagraph.block} ({now}): register again "
                  "(`btcli subnets register`, `niche chain register` on localnet)")
        if self.reason is None:
            log.error("DEREGISTERED: %s", reason)
        self.reason = reason
        return reason
