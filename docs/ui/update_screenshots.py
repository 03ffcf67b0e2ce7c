"""Copy the browser test's screenshots of each tab into docs/ui/, small enough to commit.

    TEXTINV_ARTIFACTS=/tmp/shots python -m pytest -q -n 0 tests/test_ui.py
    python docs/ui/update_screenshots.py /tmp/shots

Half size, a 64-colour palette: the pages are flat UI colours, so this keeps them legible at a
tenth of the bytes.
"""
from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

SHOTS = {  # the test's screenshot → the doc's picture of that tab
    "12-train-stopped.png": "train.png",
    "03-generated-with-trigger.png": "generate.png",
    "10-library-exported-png-card.png": "library.png",
    "09-bias-measured.png": "bias.png",
}


def main(artifacts: str) -> None:
    here = Path(__file__).parent
    for src, dst in SHOTS.items():
        image = Image.open(Path(artifacts) / src).convert("RGB")
        image = image.resize((image.width // 2, image.height // 2), Image.LANCZOS)
        image.quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(here / dst, optimize=True)
        print(f"{src} → docs/ui/{dst} ({(here / dst).stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/textinv-ui-artifacts")
