"""Every error type gptx raises on purpose, in one module both packages import (no PyTorch needed): the CLI prints
a `GptxError` as one clear line and exits 1, anything else is a bug and keeps its traceback. Errors about a bad
argument also subclass `ValueError`, so API users can catch them the usual way."""


class GptxError(Exception):
    """An error the user caused or can fix (bad path, bad option, missing dependency)."""


class InvalidInput(GptxError, ValueError):
    """A bad argument or value passed by the caller: wrong type, out of range, does not fit the model."""


class ManifestError(GptxError):
    """The export directory is missing, incomplete, tampered with or from an incompatible gptx."""


class ModelLoadError(GptxError):
    """A model could not be found, fetched or understood."""


class ExportError(GptxError):
    """Export could not complete; nothing was left in the output directory."""


class TrainError(GptxError, ValueError):
    """Bad training input (data file, out_dir, resume, hyperparameters) or a run that diverged."""


class BuildError(GptxError):
    """A TensorRT engine could not be built."""


class MissingDependency(GptxError):
    """An optional package is not installed; the message names the extra to install."""


class GenerationError(GptxError):
    """Generation cannot go on: the model produced non-finite logits (corrupt weights, fp16 overflow)."""


class QueueFull(GptxError):
    """The serving queue is at its bound; retry later (the HTTP layer answers 429)."""
