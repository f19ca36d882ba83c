"""One `niche localnet` per workdir: a second run on the same folder would wipe the first's
chain, state and logs under it. The first holds an exclusive flock on WORKDIR/localnet.lock
for as long as it runs (the kernel lets go when the process ends, however it ends); the
second is refused with one line naming the holder."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from niche.errors import ConfigError
from niche.file_lock import holder

LOCK_NAME = "localnet.lock"


@contextlib.contextmanager
def workdir_lock(workdir: Path) -> Iterator[Path]:
    """Hold WORKDIR's lock for the body; ConfigError (exit 2) when another process holds
    it. Yields the lock file."""
    folder = Path(workdir).expanduser().resolve()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--workdir {folder} is a file, not a folder: pass another "
                          "--workdir (a folder, created if missing)")
    path = folder / LOCK_NAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(f"--workdir {folder}: cannot create {exc.filename or path} "
                          f"({exc.strerror or exc}): pass another --workdir") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"{folder} is in use by another niche localnet ({holder(path)}); "
                              "stop it or pass another --workdir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "started": time.time(),
                                 "command": " ".join(["niche", *sys.argv[1:]])[:200]}).encode())
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the lock
