"""The policies vLLM can evict with, defined as the HF runtime defines them (`lookaheadkv_kernels.runtime`).

The runtime package refuses to import under the transformers vLLM needs (it subclasses a cache API
that changed after 5.2), so the few definitions eviction needs are stated here again: which prompt
rows score, with which `attention_scores` options, what is always kept, and how LookaheadKV adds
SnapKV's votes. `python_tests/integrations/test_vllm_engine.py` checks that vLLM keeps the positions the runtime
keeps for the same prompt, policy and budget.

One difference is forced by the engine: every layer of a request keeps the same number of entries,
because one block table serves all of its layers; LookaheadKV's depth ramp (per-layer budgets) is
therefore 0 here, the paper's uniform budgets.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real

import torch

NUM_SINK = 4  # leading tokens every policy keeps (the runtime's DEFAULT_NUM_SINK)
FULL = "full"  # the name that asks for no eviction


@dataclass(frozen=True)
class ScoreOptions:
    """`attention_scores` arguments a policy chooses, and the shift applied to their result."""

    gqa_reduce: str = "mean"
    pool_kernel: int = 1
    pool_type: str = "max"
    query_reduce: str = "mean"
    pool_shift: int = 0


@dataclass(frozen=True)
class Policy:
    """How one policy scores a prompt of N tokens.

    `window` last prompt rows' queries score the keys before them (SnapKV's observation window;
    LookaheadKV's window votes); SnapKV keeps that window unscored (`window_kept`). `lookahead`: the
    learned lookahead rows score every prompt key, and `window_votes` times the window's share of the
    attention mass is added to theirs. Without either, keys are scored by recency (StreamingLLM).
    """

    name: str
    window: int = 0
    window_kept: bool = False
    options: ScoreOptions = ScoreOptions()
    lookahead: bool = False
    window_votes: float = 0.0
    num_sink: int = NUM_SINK

    def query_window(self, num_prompt: int) -> int:
        """Prompt rows whose queries score (at least one key is left to score)."""
        return min(self.window, num_prompt - 1)

    def num_scored(self, num_prompt: int) -> int:
        return num_prompt - (self.query_window(num_prompt) if self.window_kept else 0)

    def always_kept(self, num_prompt: int) -> int:
        """Entries kept whatever the scores: the sinks and the unscored tail."""
        scored = self.num_scored(num_prompt)
        return min(self.num_sink, scored) + num_prompt - scored


POLICIES = {
    policy.name: policy
    for policy in (
        # The runtime's LookaheadKV defaults (query max, avg-pool 17, shift 4, window votes 1.0 over 32 rows).
        Policy(
            "lookaheadkv",
            window=32,
            options=ScoreOptions("mean", 17, "avg", "max", 4),
            lookahead=True,
            window_votes=1.0,
        ),
        Policy("snapkv", window=32, window_kept=True, options=ScoreOptions("mean", 7, "max", "mean", 0)),
        Policy("streamingllm"),
    )
}


def policy_names() -> list[str]:
    return [*POLICIES, FULL]


def resolve_budget(budget, num_prompt: int) -> int:
    """Entries per layer and KV head: an int token count, or a float ratio of the prompt in (0, 1]
    (rounded, at least 1)."""
    if isinstance(budget, bool) or not isinstance(budget, Real):
        raise ValueError(f"budget must be an int or a float ratio in (0, 1], got {budget!r}")
    if isinstance(budget, Integral):
        if budget < 1:
            raise ValueError(f"budget must be >= 1 token, got {budget}")
        return int(budget)
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"a float budget is a ratio of the prompt and must be in (0, 1], got {budget}")
    return max(1, round(float(budget) * num_prompt))


def shift_scores(scores: torch.Tensor, shift: int) -> torch.Tensor:
    """scores[..., j] <- scores[..., max(j - shift, 0)]: kept spans reach `shift` keys past what the
    queries attend to (the runtime's `shift_scores`)."""
    if shift == 0:
        return scores
    shift = min(shift, scores.shape[-1])
    first = scores[..., :1].expand(*scores.shape[:-1], shift)
    return torch.cat([first, scores[..., : scores.shape[-1] - shift]], dim=-1)


def shares(scores: torch.Tensor, num_sink: int) -> torch.Tensor:
    """scores over their sum past the sinks: each key's share of the mass the ranking decides on."""
    return scores / scores[..., num_sink:].sum(-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)


def add_votes(rows: torch.Tensor, window: torch.Tensor, weight: float, num_sink: int) -> torch.Tensor:
    """The rows' shares plus `weight` times the window's shares, over the keys both score."""
    both = min(rows.shape[-1], window.shape[-1])
    mixed = shares(rows, num_sink)
    mixed[..., :both] += weight * shares(window, num_sink)[..., :both]
    return mixed
