"""Convert CLIP's BPE file (as shipped in the open_clip wheel) to vocab.json + merges.txt.

Run once; the output lives in textinv/data/mini/tokenizer/ (the mini model's tokenizer and the default CLIP tokenizer) so that textinv never depends on
open_clip.  Usage: python tools/convert_clip_vocab.py bpe_simple_vocab_16e6.txt.gz OUT_DIR
"""
import gzip
import json
import sys
from pathlib import Path


def bytes_to_unicode():
    # The byte -> printable-unicode table from OpenAI's CLIP tokenizer (same as GPT-2's).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def main(src: str, out: str) -> None:
    lines = gzip.open(src).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
