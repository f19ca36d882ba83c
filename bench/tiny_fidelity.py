"""Do the tiny checkpoints react to their inputs like real models? PSNR table + contact sheet.

For every model x pipeline and a few requests: PSNR (dB) of each variant against the float32
reference request - other prompt, other seed, half the steps, other conditioning image,
conditioning scale 0, bfloat16 - and whether the issue's thresholds hold (other prompt / seed /
image < 25 dB; half steps >= 10 dB below bfloat16; bfloat16 > 35 dB). Writes a contact sheet
of a few prompts x seeds per model so a person can see what the prompts draw.

    .venv/bin/python bench/tiny_fidelity.py [--root DIR] [--quick] [--sheet out.png]

Without --root the tiny checkpoints are built afresh (with the committed trained weights) in
a temporary folder.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHEET_PROMPTS = [
    "a red circle on a blue background",
    "a large yellow square on a black background",
    "a small white triangle in the left on a green background",
    "a blue ring in the right on a yellow background",
    "a large black cross on a pink gradient background",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=None, help="tiny checkpoint root")
    ap.add_argument("--quick", action="store_true", help="one request per model x pipeline")
    ap.add_argument("--sheet", type=Path, default=Path("tiny_fidelity_sheet.png"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    from niche.models.quiet import quiet_libraries

    quiet_libraries()
    import PIL.Image

    from niche.devnet.tiny import build_tiny_models
    from niche.devnet.training.fidelity import contact_sheet, default_cases, engines, measure

    tmp = None
    root = args.root
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="niche-tiny-")
        root = build_tiny_models(Path(tmp.name))
    e32, e16 = engines(root, ["flux-schnell", "kolors"], threads=args.threads)
    cols = ["other prompt", "other seed", "other image", "half steps", "scale 0", "bfloat16"]
    print(f"{'model':<13}{'pipeline':<18}" + "".join(f"{c:>13}" for c in cols) + "  verdict")
    failures = 0
    start = time.monotonic()
    for case in default_cases(quick=args.quick):
        row, _ = measure(e32, e16, case)
        bad = row.failures()
        failures += bool(bad)
        cells = "".join(f"{row.db[c]:>13.1f}" if c in row.db else f"{'-':>13}" for c in cols)
        print(f"{case.model:<13}{case.pipeline:<18}{cells}  {'ok' if not bad else '; '.join(bad)}"
              f"   [{case.prompt}]")
    print(f"{failures} request(s) out of bounds; {time.monotonic() - start:.0f} s")
    sheets = [contact_sheet(e32, SHEET_PROMPTS, model=m) for m in ("flux-schnell", "kolors")]
    gap = 8
    out = PIL.Image.new("RGB", (sum(s.width for s in sheets) + gap, sheets[0].height), "white")
    out.paste(sheets[0], (0, 0))
    out.paste(sheets[1], (sheets[0].width + gap, 0))
    out.save(args.sheet)
    print(f"contact sheet (rows: prompts; columns: seeds 0-3; left flux-schnell, right kolors): "
          f"{args.sheet}")
    for i, p in enumerate(SHEET_PROMPTS):
        print(f"  row {i}: {p}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
