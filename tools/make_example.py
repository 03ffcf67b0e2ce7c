"""Make the example embedding card shipped in textinv/data/examples/ (the README's first command).

It is a synthetic SD 1.x embedding (2 vectors × 768, fixed seed, norms like real CLIP tokens),
written as an AUTOMATIC1111 PNG embedding card so that `textinv inspect` has something real to
read on a fresh machine.  Usage: python tools/make_example.py
"""
from pathlib import Path

import torch

from textinv import formats

OUT = Path(__file__).resolve().parents[1] / "textinv" / "data" / "examples" / "example-card.png"


def main() -> None:
    g = torch.Generator().manual_seed(2024)
    vectors = torch.randn(2, 768, generator=g) * 0.014  # CLIP ViT-L token rows have norms near 0.4
    emb = formats.Embedding(
        "example-card", {"clip": vectors},
        meta={"step": 500, "sd_checkpoint": None, "sd_checkpoint_name": "synthetic (not trained)"},
    )
    formats.save(emb, OUT, "png")
    print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
