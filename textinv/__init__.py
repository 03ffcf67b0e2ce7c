"""textinv — Textual Inversion embeddings: train, store in every format, use in any SD pipeline.

    import textinv
    emb = textinv.load("my-cat.pt")            # any format, detected by content
    textinv.apply(pipe, [emb, "embeddings/"])  # trigger words in a diffusers SD/SDXL pipeline
    textinv.remove(pipe)                       # exact restore
    textinv.to_single(textinv.load("xti.safetensors"))  # a per-layer (P+) embedding, layers averaged
    textinv.train(images="photos/", token="<my-cat>", init="cat", steps=500)
    textinv.generate("a (my-cat:1.2) on the moon", embeddings=["embeddings/"], n=4, out="outputs")
"""
from .version import __version__  # noqa: F401 - one string, shared with generation (a PNG's Version)

from .errors import EmbeddingFileError, ModelMismatchError, TextinvError  # noqa: E402
from .formats import Embedding, load, save, to_single  # noqa: E402
from . import models  # noqa: E402,F401 - names the built-in model's family for inspect and the library
from .sources import load_all  # noqa: E402 - a library's training runs count once, as their final embedding
from .tokens import apply, expand, remove  # noqa: E402
from . import perlayer  # noqa: E402,F401 - plugs per-layer (P+) embeddings into tokens and prompts
from . import generation, training  # noqa: E402 - what textinv.generate and textinv.train call


def train(*args, **kwargs):
    """Train an embedding; see :func:`textinv.training.train` and :class:`textinv.training.TrainConfig`."""
    return training.train(*args, **kwargs)


def generate(*args, **kwargs):
    """Generate images of an A1111-style prompt; see :func:`textinv.generation.generate`."""
    return generation.generate(*args, **kwargs)


__all__ = ["Embedding", "EmbeddingFileError", "ModelMismatchError", "TextinvError", "apply", "expand", "generate", "load",
           "load_all", "remove", "save", "to_single", "train"]
