"""Exceptions that carry a config key path, so every bad input names what to change."""


class ConfigError(ValueError):
    """A config value, key or section is wrong.

    ``path`` is the dotted key path (``DataLoader.Train.dataset.transform_ops.1.RandCropImage.size``);
    the message always starts with it so users can find the line in their YAML.
    """

    def __init__(self, path, message):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class WeightsError(RuntimeError):
    """A weights file is missing, corrupt, unsafe, or does not fit the model."""


class DataError(ValueError):
    """A dataset list or image is wrong; the message names the file and line."""


class ExportError(RuntimeError):
    """An exported model does not predict what the model it came from predicts; the message
    names the export certificate."""
