"""tlpipe: a reproducible transfer-learning pipeline for image classification (DVC + Keras)."""

__version__ = "0.1.0"
