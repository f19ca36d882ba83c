"""Miner: the signed HTTP server (axon) over the engine."""
