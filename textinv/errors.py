"""One exception family for everything a user can get wrong.

The CLI prints ``str(err)`` as a single line and exits non-zero; messages therefore name the
file or argument and say what is wrong, without a traceback.
"""


class TextinvError(Exception):
    """A problem with the user's input (a file, an argument, a model) — never a bug."""


class EmbeddingFileError(TextinvError):
    """An embedding file that cannot be read, or is not a usable embedding."""


class ModelMismatchError(TextinvError):
    """An embedding made for another model family (width mismatch)."""
