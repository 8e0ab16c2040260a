"""SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation")."""

from __future__ import annotations

from ...ops.validation import check_int
from ..scoring import ScoreOptions, WindowScorer
from .base import DEFAULT_NUM_SINK, Policy, register, register_preset


@register
class SnapKV(Policy):
    """The last `window` prompt queries vote for the keys before them; the window is kept.

    Defaults are the paper's: window 32, max-pool 7, the window's votes averaged
    (`query_reduce="mean"`, the paper's sum up to a constant). GQA: scores averaged over each KV
    head's query heads (`gqa_reduce`), as in kvpress. `pool_shift` moves every pooled score that many
    keys later (`shift_scores`; 0: each key keeps its own). `SnapKV.kvpress()` gives kvpress's
    defaults (window 64, avg-pool 5), also by the name "snapkv-kvpress".
    """

    name = "snapkv"

    def __init__(
        self,
        window: int = 32,
        pool_kernel: int = 7,
        pool_type: str = "max",
        gqa_reduce: str = "mean",
        num_sink: int = DEFAULT_NUM_SINK,
        query_reduce: str = "mean",
        pool_shift: int = 0,
    ):
        super().__init__(num_sink)
        check_int("window", window, 0)
        check_int("pool_shift", pool_shift, 0)
        self.window = window
        self.options = ScoreOptions(gqa_reduce, pool_kernel, pool_type, query_reduce, pool_shift)

    def unscored_tail(self, num_prompt):
        return min(self.window, num_prompt - 1)  # as WindowScorer: at least one scored key

    @classmethod
    def kvpress(cls, num_sink: int = DEFAULT_NUM_SINK) -> SnapKV:
        """kvpress's SnapKVPress defaults: window 64, avg-pool 5."""
        return cls(window=64, pool_kernel=5, pool_type="avg", num_sink=num_sink)

    def scorer(self, run):
        return WindowScorer(run, self.window, self.options)


register_preset("snapkv-kvpress", SnapKV.kvpress)
