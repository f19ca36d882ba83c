"""Reading a conditioning image from a file for the CLI, bounded against decompression bombs.

Uses the miner's safe decoder (niche.imaging) when present; otherwise PIL with a pixel cap,
verify() on a first open, then a full decode on a second.
"""
from __future__ import annotations

from pathlib import Path

import PIL.Image

from niche.errors import InvalidRequest

MAX_FILE_BYTES = 32 * 1024 * 1024
MAX_PIXELS = 4096 * 4096


def open_image_file(path: Path) -> PIL.Image.Image:
    path = Path(path)
    if not path.is_file():
        raise InvalidRequest(f"no such file {path}", field="image")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise InvalidRequest(f"{path} is larger than {MAX_FILE_BYTES} bytes", field="image")
    try:
        from niche import imaging  # the miner engineer's safe decoders
    except ImportError:
        imaging = None
    if imaging is not None and hasattr(imaging, "load_image_file"):
        try:
            return imaging.load_image_file(path).convert("RGB")
        except InvalidRequest:
            raise
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad input
            raise InvalidRequest(f"cannot decode {path}: {exc}", field="image") from None
    try:
        with PIL.Image.open(path) as probe:
            if probe.width * probe.height > MAX_PIXELS:
                raise InvalidRequest(f"{probe.width}x{probe.height} pixels is too large",
                                     field="image")
            probe.verify()
        with PIL.Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except InvalidRequest:
        raise
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as exc:
        raise InvalidRequest(f"cannot decode {path}: {exc}", field="image") from None
