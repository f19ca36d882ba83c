"""Silence library chatter for command-line use.

The one-shot commands (`niche generate`, `verify`, `models build-tiny`) promise one JSON line
on stdout and at most one error line on stderr: they drop progress bars too. The long-running
neurons and `niche models download` keep progress bars (`progress=True`): a download or a
load of tens of GB that prints nothing for minutes looks hung. Either way the libraries'
load reports and deprecation warnings (per-weight "missing keys", FutureWarnings) are quiet:
they say nothing an operator can act on. The per-step denoising bar is always off
(families/base.py `place`): it would print on every request.
"""
from __future__ import annotations

import os
import warnings


def quiet_libraries(*, progress: bool = False) -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    for lib in (dlog, tlog):
        lib.set_verbosity_error()
        if progress:
            lib.enable_progress_bar()
        else:
            lib.disable_progress_bar()
    # functions, not the HF_HUB_DISABLE_PROGRESS_BARS variable: the hub reads that once at
    # import and it would then win over every later enable (an operator's own =1 still does)
    if progress:
        enable_progress_bars()
    else:
        disable_progress_bars()
