"""sliceout_fx: SliceOut as a torch.fx model transformation.

``convert(model, p=0.3)`` finds a model's dropout sites (or expand convolutions), works out which
ops must share one contiguous slice of channels, and returns a module that trains on sliced weights
(smaller matmuls and convolutions, smaller saved activations) and evaluates at full width, with the
original model's parameters, class and ``state_dict`` keys.
"""

from .api import (
    Analysis,
    analyse,
    analyse_blocks,
    convert,
    explain,
    full_width,
    set_slicing,
    to_original,
)
from .calibration import BatchNormDrift, batch_norm_drift, recalibrate_batch_norm
from .config import SliceOutConfig
from .errors import (
    ExampleInputsError,
    ShapeInferenceError,
    SliceOutConfigError,
    SliceOutError,
    UnsupportedModelError,
    UntraceableModelError,
)
from .module import SliceOutModule
from .report import Report
from .resume import load_sampler_state, sampler_state
from .rules import OpRule, register_rule, registered_rules
from .schedule import SliceSchedule

__all__ = [
    "Analysis",
    "BatchNormDrift",
    "ExampleInputsError",
    "OpRule",
    "Report",
    "ShapeInferenceError",
    "SliceOutConfig",
    "SliceOutConfigError",
    "SliceOutError",
    "SliceOutModule",
    "SliceSchedule",
    "UnsupportedModelError",
    "UntraceableModelError",
    "analyse",
    "analyse_blocks",
    "batch_norm_drift",
    "convert",
    "explain",
    "full_width",
    "load_sampler_state",
    "recalibrate_batch_norm",
    "register_rule",
    "registered_rules",
    "sampler_state",
    "set_slicing",
    "to_original",
]

__version__ = "0.1.0"
