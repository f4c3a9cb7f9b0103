"""Errors tlpipe raises on purpose: each message names the file or key and says what to do."""


class TlpipeError(Exception):
    """Base of every deliberate tlpipe error; stages print its message without a traceback."""


class ConfigError(TlpipeError):
    """A parameter in params.yaml is unknown, mistyped, of the wrong type or out of range."""


class DataError(TlpipeError):
    """The image source or a split cannot be used."""


class ImageDecodeError(DataError):
    """One image file cannot be decoded; `reason` is a short phrase for rejected.csv."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class WeightsError(TlpipeError):
    """Backbone weights cannot be found, downloaded or loaded."""


class FeatureFileError(TlpipeError):
    """A feature or cache file is damaged or does not match the current parameters."""


class ModelFileError(TlpipeError):
    """A saved model is missing, damaged, or lacks tlpipe's metadata."""
