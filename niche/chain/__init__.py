"""Chain access behind one interface: the bittensor SDK for real networks, SQLite for localnet."""
