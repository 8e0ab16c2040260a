"""What every policy shares: the `Policy` base class, the `Run` it scores, and the registry of names.

A policy only decides *scores*; the engine (eviction.py) compacts every layer with `select_compact`.
It scores the prompt keys of one layer at a time, while the prefill passes through that layer (see
`LayerInputs`), so each layer is evicted before the next one fills its cache. Scores cover prompt
positions [0, S); positions [S, N) (an observation window) and the first `num_sink` are always kept.

A policy class registered with `@register` is known by its `name` to `make_policy` (so to
`generate`, `prefill_and_evict` and the evaluation); `register_preset` names a ready configuration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...ops.validation import check_int
from ..models import LayerParts
from ..scoring import Scorer

DEFAULT_NUM_SINK = 4  # StreamingLLM's attention sinks, protected for every policy (docs/tuning.md)


@dataclass
class Run:
    """One eviction: the model, prompt length N, the rows appended after the prompt, per-layer budgets."""

    model: object
    parts: list[LayerParts]
    num_prompt: int
    num_extra: int
    budgets: list[int]
    max_new_tokens: int | None


class Policy:
    """Base class: a name, the protected leading tokens, a per-layer budget rule, a scorer."""

    name = "policy"
    appends_rows = False  # True for policies whose extra_tokens prefill draft rows after the prompt

    def __init__(self, num_sink: int = DEFAULT_NUM_SINK):
        check_int("num_sink", num_sink, 0)
        self.num_sink = num_sink

    @classmethod
    def from_options(cls, model=None, **options) -> Policy:
        """The policy `make_policy(name, model, **options)` builds; `model` is there for policies that
        need something shipped for it."""
        return cls(**options)

    def layer_budgets(self, budget: int, num_prompt: int, num_layers: int) -> list[int]:
        """Per-layer budgets from one (already resolved) budget; uniform unless a policy says otherwise."""
        return [budget] * num_layers

    def unscored_tail(self, num_prompt: int) -> int:
        """Trailing prompt entries kept unscored (an observation window, recent tokens)."""
        return 0

    def always_kept(self, num_prompt: int) -> int:
        """Entries per layer kept whatever the scores: the sinks and the unscored tail. A layer budget
        below this (and below the prompt) cannot be honoured."""
        tail = self.unscored_tail(num_prompt)
        return min(self.num_sink, num_prompt - tail) + tail

    def extra_tokens(self, model, input_ids: torch.Tensor, max_new_tokens: int | None) -> torch.Tensor | None:
        """Token rows [B, E] to prefill after the prompt for scoring (dropped from the cache afterwards)."""
        return None

    def scorer(self, run: Run) -> Scorer:
        raise NotImplementedError

    def __repr__(self):
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


POLICIES: dict[str, type[Policy]] = {}  # name -> class, in registration order
PRESETS: dict[str, Callable[..., Policy]] = {}  # name -> factory of a named configuration of a policy


def register(cls: type[Policy]) -> type[Policy]:
    """Class decorator: make `cls` known to `make_policy` by `cls.name`."""
    if not (isinstance(cls, type) and issubclass(cls, Policy)):
        raise TypeError(f"register takes a Policy subclass, got {cls!r}")
    _claim(cls.name, cls)
    POLICIES[cls.name] = cls
    return cls


def register_preset(name: str, factory: Callable[..., Policy]) -> None:
    """Make `factory(**options)` known to `make_policy` as `name` (e.g. "snapkv-kvpress")."""
    _claim(name, factory)
    PRESETS[name] = factory


def _claim(name: str, owner) -> None:
    """Refuse a name registered for something else (the same definition, reloaded, may register again)."""
    current = POLICIES.get(name, PRESETS.get(name))
    if current is not None and _origin(current) != _origin(owner):
        raise ValueError(f"policy name {name!r} is already registered for {current!r}")


def _origin(definition) -> tuple:
    return getattr(definition, "__module__", None), getattr(definition, "__qualname__", None)


def policy_names() -> list[str]:
    """Every name `make_policy` accepts: the registered policies, then the presets."""
    return list(POLICIES) + list(PRESETS)


def make_policy(policy, model=None, **options) -> Policy:
    """A Policy instance from an instance or a registered name ("snapkv", "snapkv-kvpress", ...),
    built by the class's `from_options(model, **options)` (LookaheadKV loads the module shipped for
    `model` when no `module` option is given)."""
    if isinstance(policy, Policy):
        if options:
            raise ValueError(f"policy options {sorted(options)} given with a ready policy instance")
        return policy
    if policy in PRESETS:
        return PRESETS[policy](**options)
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {sorted(POLICIES) + sorted(PRESETS)}")
    return POLICIES[policy].from_options(model, **options)


def greedy_continuation(model, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """The greedy full-cache continuation [B, <=max_new_tokens] of `input_ids` (stops at EOS)."""
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
    )
    return out[:, input_ids.shape[1] :]
