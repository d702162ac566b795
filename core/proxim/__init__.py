"""proxim: reinforcement-learning objectives for language models, composed from plugin parts.

An objective is a Baseline, an Advantage estimator and a TrustRegion (plus aggregation and penalty
options), each supplied by a plugin through the ``proxim`` entry-point group::

    import proxim
    obj = proxim.objective("grpo", kl_coef=0.0)
    est = obj.advantages(batch)            # stage 1, once per rollout
    out = obj.loss(logprobs, batch, est)   # stage 2, per minibatch
    out.loss.backward()

Importing proxim loads torch, pluggy and attrs only, and scans no plugins: discovery happens when a
registry is first needed.
"""

from proxim import ops
from proxim.aggregation import MODES as AGGREGATIONS
from proxim.errors import (
    BatchError,
    ConfigurationError,
    DuplicateNameError,
    PluginError,
    PluginWarning,
    ProximError,
    UnavailableError,
    UnknownNameError,
)
from proxim.hookspecs import Register, hookimpl
from proxim.objective import Objective, Options, objective, preference_objective
from proxim.parts import Advantage, Baseline, Part, Preference, Preset, RegionOutput, TrustRegion
from proxim.penalties import AdaptiveKLController, FixedKLController, value_loss
from proxim.preference import PreferenceObjective
from proxim.registry import PartInfo, Registry, available, build_registry, default_registry
from proxim.rollout import Estimate, LossOutput, Rollout

__version__ = "0.1.0"

__all__ = [
    "AGGREGATIONS",
    "AdaptiveKLController",
    "Advantage",
    "Baseline",
    "BatchError",
    "ConfigurationError",
    "DuplicateNameError",
    "Estimate",
    "FixedKLController",
    "LossOutput",
    "Objective",
    "Options",
    "Part",
    "PartInfo",
    "PluginError",
    "PluginWarning",
    "Preference",
    "PreferenceObjective",
    "Preset",
    "ProximError",
    "RegionOutput",
    "Register",
    "Registry",
    "Rollout",
    "TrustRegion",
    "UnavailableError",
    "UnknownNameError",
    "available",
    "build_registry",
    "default_registry",
    "hookimpl",
    "objective",
    "ops",
    "preference_objective",
    "value_loss",
]
