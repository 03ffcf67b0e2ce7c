"""textinv — Textual Inversion embeddings: train, store in every format, use in any SD pipeline."""
__version__ = "0.1.0"
