"""The world to test and demo in: tiny checkpoints of the real architectures and their
training, the local subnet (`niche localnet`), dishonest miners to catch, and servers for
tests. Serving code (models, miner, validator, chain, protocol) never imports this package."""
