"""The localnet's cheating behaviours by name, importable without torch (for flag help)."""
from __future__ import annotations

CHEATS: dict[str, str] = {
    "other-seed": "answers another seed's image and states",
    "fewer-steps": "half the steps, states duplicated onto the grid",
    "resampled-steps": "half the steps, states interpolated onto the honest grid",
    "sharpened-fewer-steps": "half the steps, the image sharpened to look detailed",
    "no-guidance": "Kolors without classifier-free guidance (FLUX: fewer steps)",
    "reused-prediction": "every other step reuses the previous denoiser output",
}
