"""AUTOMATIC1111's ``parameters`` PNG text chunk: write it, read it back.

Layout (A1111's infotext)::

    PROMPT
    Negative prompt: NEGATIVE
    Steps: 30, Sampler: Euler a, CFG scale: 7, Seed: 123, Size: 512x512, Model hash: 1a2b3c4d5e, Model: name, TI hashes: "a: 0123456789ab, b: ...", Version: textinv 0.1.0

The negative line is left out when there is no negative prompt; values holding ``,``, ``:`` or a
newline are JSON-quoted, as A1111 does.
"""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .atomic import write_bytes
from .errors import TextinvError

KEY = "parameters"
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _quote(value) -> str:
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _number(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def format_parameters(prompt: str, negative: str | None, params: dict) -> str:
    """The infotext; ``params`` in order, None values left out (``TI hashes`` may be a dict)."""
    items = []
    for k, v in params.items():
        if v is None or v == {} or v == "":
            continue
        if isinstance(v, dict):
            v = ", ".join(f"{name}: {h}" for name, h in v.items())
        items.append(f"{k}: {_quote(_number(v))}")
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(", ".join(items))
    return "\n".join(lines)


def parse_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, {key: value}) from an infotext, values unquoted."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    params = {}
    for k, v in _PARAM.findall(last):
        v = v.strip()
        if len(v) > 1 and v[0] == '"' and v[-1] == '"':
            try:
                v = json.loads(v)
            except ValueError:
                pass
        params[k.strip()] = v
    return "\n".join(prompt), "\n".join(negative), params


def parse_ti_hashes(value: str) -> dict[str, str]:
    out = {}
    for item in value.split(","):
        if ":" in item:
            name, h = item.rsplit(":", 1)
            out[name.strip()] = h.strip()
    return out


def save_png(image: Image.Image, path: str | Path, parameters: str) -> Path:
    """Write ``image`` atomically as a PNG carrying ``parameters``."""
    info = PngInfo()
    info.add_text(KEY, parameters)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    write_bytes(path, buf.getvalue())
    return Path(path)


def read_parameters(path: str | Path) -> str:
    path = Path(path)
    try:
        with Image.open(path) as im:
            text = im.info.get(KEY)
            if not text:  # a text chunk after the pixels: only there once they are read
                im.load()
                text = im.info.get(KEY) or (getattr(im, "text", {}) or {}).get(KEY)
    except FileNotFoundError:
        raise TextinvError(f"{path}: no such file") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise TextinvError(f"{path}: cannot read image ({' '.join(str(e).split())})") from None
    if not text:
        raise TextinvError(f"{path}: has no A1111 'parameters' text chunk")
    return text
