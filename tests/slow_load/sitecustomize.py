"""Test hook for a miner subprocess (on PYTHONPATH only in tests/test_faults_restart.py):
its models take NICHE_TEST_LOAD_SECONDS longer to load, as FLUX.1-dev and Kolors do on a
GPU box, so a restart's loading window outlasts a validator's states fetch."""
import os
import time

_delay = float(os.environ.get("NICHE_TEST_LOAD_SECONDS", "0") or 0)
if _delay > 0:
    import niche.commands.engine_args as _engine_args

    _load = _engine_args.backend_engine_from_args

    def _slow_load(*args, **kwargs):
        time.sleep(_delay)
        return _load(*args, **kwargs)

    _engine_args.backend_engine_from_args = _slow_load
