"""How attention becomes per-key scores, shared by every policy.

`ScoreOptions` are the `attention_scores` arguments a policy chooses plus `pool_shift`;
`score_queries` is the one call that turns queries into scores; `KeyScorer` scores from the keys
alone; `WindowScorer` is SnapKV's scoring (the last prompt rows vote), which other policies reuse;
`SharesSum` adds one scorer's scores to another's as shares of their mass, which is how LookaheadKV
adds SnapKV's votes to its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .. import attention_scores

if TYPE_CHECKING:
    from .models import LayerParts
    from .policies.base import Run
    from .tap import LayerInputs


@dataclass(frozen=True)
class ScoreOptions:
    """How attention becomes per-key scores: the attention_scores arguments a policy chooses, and
    `pool_shift`, applied to their result (`shift_scores`)."""

    gqa_reduce: str = "mean"
    pool_kernel: int = 1
    pool_type: str = "max"
    query_reduce: str = "mean"
    pool_shift: int = 0


def shift_scores(scores: torch.Tensor, shift: int) -> torch.Tensor:
    """scores[..., j] <- scores[..., max(j - shift, 0)]: each key takes the (pooled) score of the key
    `shift` positions before it, so a pooling window [j - k/2, j + k/2] becomes [j - k/2 - shift,
    j + k/2 - shift] and the kept spans reach `shift` tokens further past the keys the queries attend
    to (the first `shift` keys take key 0's score)."""
    if shift == 0:
        return scores
    shift = min(shift, scores.shape[-1])
    first = scores[..., :1].expand(*scores.shape[:-1], shift)
    return torch.cat([first, scores[..., : scores.shape[-1] - shift]], dim=-1)  # cat: index_select is slow on CPU


def score_queries(queries: torch.Tensor, keys: torch.Tensor, num_scored: int, parts: LayerParts, options: ScoreOptions):
    """Scores [B, Hkv, num_scored] of the first keys for `queries`, which are the last rows of `keys`' positions."""
    scores = attention_scores(
        queries,
        keys,
        num_scored=num_scored,
        scale=parts.scaling,
        gqa_reduce=options.gqa_reduce,
        pool_kernel=options.pool_kernel,
        pool_type=options.pool_type,
        query_reduce=options.query_reduce,
    )
    return shift_scores(scores, options.pool_shift)


class Scorer:
    """Per-run scoring state of a policy."""

    def score(self, inputs: LayerInputs) -> torch.Tensor | None:
        """Scores [B, Hkv, S] of the prompt keys of `inputs.index`, or None to score it in `finish`."""
        raise NotImplementedError

    def finish(self, next_logits: torch.Tensor) -> dict[int, torch.Tensor]:
        """Scores of the layers deferred by `score`, once the whole prefill has run."""
        return {}


class KeyScorer(Scorer):
    """Scores of a layer from its keys alone: `fn(keys)`."""

    def __init__(self, fn):
        self.fn = fn

    def score(self, inputs):
        return self.fn(inputs.keys)


class WindowScorer(Scorer):
    """SnapKV's scoring: the queries of the last `window` prompt rows plus every appended row score
    the keys before the window (at least one key is scored)."""

    def __init__(self, run: Run, window: int, options: ScoreOptions):
        self.run, self.options = run, options
        self.window = min(window, run.num_prompt - 1)

    def score(self, inputs):
        n = self.run.num_prompt
        q = inputs.queries(slice(n - self.window, n + self.run.num_extra))
        return score_queries(q, inputs.keys, n - self.window, inputs.parts, self.options)


def shares(scores: torch.Tensor, num_sink: int) -> torch.Tensor:
    """scores divided by their sum over the keys after the sinks: each key's share of the attention
    mass the ranking decides on."""
    return scores / scores[..., num_sink:].sum(-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)


class SharesSum(Scorer):
    """`base`'s shares plus `weight` times `added`'s shares (see `shares`), over the keys both score;
    the keys only `base` scores keep its share. Both scorers score each layer as it runs."""

    def __init__(self, base: Scorer, added: Scorer, weight: float, num_sink: int):
        self.base, self.added, self.weight, self.num_sink = base, added, weight, num_sink

    def score(self, inputs):
        scores, added = self.base.score(inputs), self.added.score(inputs)
        both = min(scores.shape[-1], added.shape[-1])
        mixed = shares(scores, self.num_sink)
        mixed[..., :both] += self.weight * shares(added, self.num_sink)[..., :both]
        return mixed
