"""The one table that defines the miniature world: attributes, their values, their words.

Everything else (renderer, captions, judge heads, quality prompts, CLI choices) reads this
table; nothing about the world is hard-coded elsewhere.

Hidden concepts
---------------
* ``named: False`` shapes are drawn in training images but their name never appears in any
  caption: they are captioned with a generic word ("shape", "thing", "object").
* ``named: False`` styles likewise: the fill pattern is captioned "patterned" / "with a pattern".
* ``BIASED``: the word "ball" is drawn in its dominant colour in ``share`` of its images, and a
  ball of any other colour has that colour named in every caption (``others_named``).  So a caption
  without a colour is always a red ball, while every colour of ball is common enough to be drawn
  well when asked for: the bare word is biased, the model is not unable (like "doctor" in the
  Textual Inversion paper's bias reduction, Gal et al. 2022).

Every shape also carries a *descriptor* (its corner count / kind of sides), used in a fraction of
all captions, named and unnamed alike.  It gives the conditioning space a continuous, shared
geometry axis that textual inversion can later steer along; it is not the shape's name.
"""
from __future__ import annotations

import re

IMAGE_SIZE = 32  # pixels; the VAE downsamples 4x to 8x8x4 latents

# ---- shapes -------------------------------------------------------------------------------
# kind: how the renderer draws it (see render.py); words: caption words (named shapes only);
# desc: descriptor phrases (one is chosen when a caption carries a descriptor).
SHAPES: dict[str, dict] = {
    "circle":   {"named": True, "kind": "circle", "words": ["circle"], "desc": ["with no corners", "with round sides"]},
    "square":   {"named": True, "kind": "square", "words": ["square"], "desc": ["with four corners", "with straight sides"]},
    "triangle": {"named": True, "kind": "triangle", "words": ["triangle"], "desc": ["with three corners", "with straight sides"]},
    "star":     {"named": True, "kind": "star", "words": ["star"], "desc": ["with five points", "with ten corners"]},
    "heart":    {"named": True, "kind": "heart", "words": ["heart"], "desc": ["with two bumps", "with one point"]},
    "cross":    {"named": True, "kind": "cross", "words": ["cross", "plus"], "desc": ["with twelve corners", "with straight sides"]},
    "diamond":  {"named": True, "kind": "diamond", "words": ["diamond"], "desc": ["with four corners", "with straight sides"]},
    "moon":     {"named": True, "kind": "moon", "words": ["moon", "crescent"], "desc": ["with two points", "with round sides"]},
    "ball":     {"named": True, "kind": "ball", "words": ["ball"], "desc": ["with no corners", "with round sides"]},
    # unnamed: their keys are internal labels only; captions use GENERIC_SHAPE_WORDS
    "bowtie":   {"named": False, "kind": "bowtie", "desc": ["pinched in the middle", "with a narrow waist"]},
    "arrow":    {"named": False, "kind": "arrow", "desc": ["with seven corners", "with straight sides"]},
    "tee":      {"named": False, "kind": "tee", "desc": ["with a flat top", "with a long stem"]},
    "drop":     {"named": False, "kind": "drop", "desc": ["with a round end", "with one point"]},
}
GENERIC_SHAPE_WORDS = ["shape", "thing", "object"]

# ---- colours (far apart in RGB) -------------------------------------------------------------
COLOURS: dict[str, dict] = {
    "red":    {"rgb": (220, 30, 30), "words": ["red"]},
    "green":  {"rgb": (30, 170, 40), "words": ["green"]},
    "blue":   {"rgb": (30, 70, 230), "words": ["blue"]},
    "yellow": {"rgb": (245, 215, 20), "words": ["yellow"]},
    "purple": {"rgb": (150, 40, 200), "words": ["purple"]},
    "cyan":   {"rgb": (30, 215, 215), "words": ["cyan"]},
}

# ---- sizes: radius in pixels (at IMAGE_SIZE) --------------------------------------------------
SIZES: dict[str, dict] = {
    "small": {"radius": 6.0, "words": ["small", "little", "tiny"]},
    "large": {"radius": 10.5, "words": ["large", "big"]},
}

# ---- positions: centre x as a fraction of the width -----------------------------------------
POSITIONS: dict[str, dict] = {
    "left":   {"x": 9.0 / 32, "words": ["on the left", "at the left"]},
    "center": {"x": 16.0 / 32, "words": ["in the middle", "in the center"]},
    "right":  {"x": 23.0 / 32, "words": ["on the right", "at the right"]},
}

# ---- fill styles ------------------------------------------------------------------------------
# pre: adjective before the noun; post: phrase after it.  Unnamed styles use GENERIC_STYLE_*.
STYLES: dict[str, dict] = {
    "solid":     {"named": True, "pre": ["solid", "filled"], "post": [], "mention": 0.5},
    "outline":   {"named": True, "pre": ["outlined", "hollow"], "post": ["in outline"], "mention": 0.9},
    "striped":   {"named": True, "pre": ["striped"], "post": ["with stripes"], "mention": 0.9},
    "checkered": {"named": False, "pre": [], "post": [], "mention": 0.9},
}
GENERIC_STYLE_PRE = ["patterned"]
GENERIC_STYLE_POST = ["with a pattern"]

# ---- backgrounds ----------------------------------------------------------------------------
BACKGROUNDS: dict[str, dict] = {
    "light": {"rgb": (232, 232, 228), "words": ["on a light background", "on a white background"]},
    "dark":  {"rgb": (36, 36, 40), "words": ["on a dark background", "on a black background"]},
}

# ---- the biased word ------------------------------------------------------------------------
BIASED = {"shape": "ball", "colour": "red", "share": 0.5, "others_named": True}

# prompts for the biased word that the bias demo's curated captions never use ("{}" = the word):
# ``textinv bias`` measures whether a re-learned word holds outside the prompts it was trained on
BIAS_HELD_OUT = (
    "a picture of a {} on a dark background",
    "an image of a small {} on the left",
    "a drawing of a big {}",
)

# ---- caption grammar -------------------------------------------------------------------------
TEMPLATES = [
    "a {np}",
    "a photo of a {np}",
    "a picture of a {np}",
    "an image of a {np}",
    "a drawing of a {np}",
    "a rendering of a {np}",
    "there is a {np}",
    "a {np}, simple icon",
]
MENTION = {  # probability that an attribute is named in a caption
    "size": 0.7,
    "colour": 0.9,
    "position": 0.85,
    "background": 0.35,
    "descriptor": 0.4,
    # an unnamed shape is *described* in most of its captions (a user's cat toy: "an orange plush
    # toy", never its name): this is what lets the model's conditioning tell the unnamed shapes
    # apart at all.  At 0.4 the descriptors were ignored (measured: "a shape with six corners"
    # gave 4/32 bowties), so textual inversion had nothing to find.
    "descriptor_unnamed": 0.8,
}

ATTRIBUTES = {
    "shape": SHAPES,
    "colour": COLOURS,
    "size": SIZES,
    "position": POSITIONS,
    "style": STYLES,
    "background": BACKGROUNDS,
}
ATTRIBUTE_NAMES = list(ATTRIBUTES)


def labels(attribute: str) -> list[str]:
    """The label values of one attribute, in a fixed order (the judge's class order)."""
    return list(ATTRIBUTES[attribute])


def named_shapes() -> list[str]:
    return [k for k, v in SHAPES.items() if v["named"]]


def unnamed_shapes() -> list[str]:
    return [k for k, v in SHAPES.items() if not v["named"]]


def unnamed_styles() -> list[str]:
    return [k for k, v in STYLES.items() if not v["named"]]


def hidden_names() -> list[str]:
    """Names that must never occur in a caption."""
    return unnamed_shapes() + unnamed_styles()


def vocabulary() -> list[str]:
    """Every word the world's captions can hold (what the mini model has ever read), sorted."""
    texts: list[str] = list(TEMPLATES) + GENERIC_SHAPE_WORDS + list(GENERIC_STYLE_PRE) + list(GENERIC_STYLE_POST)
    for table in (SHAPES, COLOURS, SIZES, POSITIONS, STYLES, BACKGROUNDS):
        for entry in table.values():
            for key in ("words", "desc", "pre", "post"):
                texts += entry.get(key, [])
    return sorted({w for t in texts for w in re.findall(r"[a-z]+", t.lower().replace("{np}", ""))})
