"""Exceptions raised by sliceout_fx: each message says what went wrong and how to fix it."""


class SliceOutError(Exception):
    """Base class for sliceout_fx errors."""


class UntraceableModelError(SliceOutError):
    """torch.fx could not trace the model (data-dependent control flow, unsupported Python)."""


class ShapeInferenceError(SliceOutError):
    """The model could not be run on example inputs to learn tensor shapes."""


class SliceOutConfigError(SliceOutError, ValueError):
    """An invalid rate, normalisation, mode or site specification."""
