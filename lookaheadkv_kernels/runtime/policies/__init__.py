"""Eviction policies, one module each; `base` holds the `Policy` class and the registry of names.

Every module of this package is imported here, so a policy registered in its own new module
(`@register`) is known by name without touching any list.
"""

import importlib
import pkgutil

from ..scoring import ScoreOptions, Scorer, shift_scores
from .base import (
    DEFAULT_NUM_SINK,
    POLICIES,
    PRESETS,
    Policy,
    Run,
    greedy_continuation,
    make_policy,
    policy_names,
    register,
    register_preset,
)

# isort: off
# Import order is registration order, the order in which every derived list names the policies.
from .lookaheadkv import (
    LOOKAHEAD_DEPTH_RAMP,
    LOOKAHEAD_POOL_KERNEL,
    LOOKAHEAD_POOL_SHIFT,
    LOOKAHEAD_POOL_TYPE,
    LOOKAHEAD_QUERY_REDUCE,
    LOOKAHEAD_WINDOW,
    LOOKAHEAD_WINDOW_VOTES,
    LookaheadKV,
    depth_ramp_budgets,
)
from .snapkv import SnapKV
from .pyramidkv import PyramidKV
from .streamingllm import StreamingLLM
from .knorm import KNorm
from .random import RandomPolicy
from .laq import LAQ
from .speckv import SpecKV
from .oracle import Oracle
# isort: on

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "DEFAULT_NUM_SINK",
    "LAQ",
    "LOOKAHEAD_DEPTH_RAMP",
    "LOOKAHEAD_POOL_KERNEL",
    "LOOKAHEAD_POOL_SHIFT",
    "LOOKAHEAD_POOL_TYPE",
    "LOOKAHEAD_QUERY_REDUCE",
    "LOOKAHEAD_WINDOW",
    "LOOKAHEAD_WINDOW_VOTES",
    "POLICIES",
    "PRESETS",
    "KNorm",
    "LookaheadKV",
    "Oracle",
    "Policy",
    "PyramidKV",
    "RandomPolicy",
    "Run",
    "ScoreOptions",
    "Scorer",
    "SnapKV",
    "SpecKV",
    "StreamingLLM",
    "depth_ramp_budgets",
    "greedy_continuation",
    "make_policy",
    "policy_names",
    "register",
    "register_preset",
    "shift_scores",
]
