"""Exceptions raised by sliceout_fx: each message says what went wrong and how to fix it."""


class SliceOutError(Exception):
    """Base class for sliceout_fx errors."""


class UntraceableModelError(SliceOutError):
    """torch.fx could not trace the model (data-dependent control flow, unsupported Python)."""


class ShapeInferenceError(SliceOutError):
    """The model could not be run on example inputs to learn tensor shapes."""


class UnsupportedModelError(SliceOutError, TypeError):
    """The model is of a kind sliceout_fx does not take: a ``DataParallel``,
    ``DistributedDataParallel`` or ``torch.compile`` wrapper (convert the module inside, then wrap
    or compile the converted model), or a TorchScript module (convert the eager module)."""


class SliceOutConfigError(SliceOutError, ValueError):
    """An invalid rate, normalisation, mode or site specification."""


class ExampleInputsError(ShapeInferenceError, UntraceableModelError):
    """The model itself fails on the example inputs (a wrong shape, dtype or argument).

    The message names the inputs' shapes, the module (and source line) where the model failed
    and the underlying error. A :class:`ShapeInferenceError` (what the fx front end raised for it
    before) and an :class:`UntraceableModelError` (what the block-wise front end raised).
    """
