"""textinv's version: one string, kept equal to pyproject.toml's (a test checks), in a module of
its own so that any module can name it without importing the package."""
__version__ = "0.1.0"
