"""LAQ (Wang et al., 2025, "Lookahead Q-Cache: Achieving More Consistent KV Eviction via Pseudo Query")."""

from __future__ import annotations

import torch

from ...ops.validation import check_int
from ..cache import CompactedCache, compact_layer
from ..scoring import ScoreOptions, Scorer, WindowScorer, score_queries
from ..tap import tap_layers
from .base import DEFAULT_NUM_SINK, Policy, Run, register


class LAQScorer(Scorer):
    """Keeps each layer full while drafting on a SnapKV-compressed copy; scores every layer in `finish`."""

    def __init__(self, policy: LAQ, run: Run):
        self.policy, self.run = policy, run
        self.snap = WindowScorer(run, policy.snap_window, policy.snap_options)
        self.window = min(policy.window, run.num_prompt - 1)
        self.copy = CompactedCache()
        self.prompt_queries: dict[int, torch.Tensor] = {}  # last `window` prompt rows, per layer
        self.pseudo_queries: dict[int, list[torch.Tensor]] = {}  # one [B, Hq, 1, D] per drafted token
        self.full_keys: dict[int, torch.Tensor] = {}

    def score(self, inputs):
        n, idx = self.run.num_prompt, inputs.index
        self.prompt_queries[idx] = inputs.queries(slice(n - self.window, n))
        self.full_keys[idx] = inputs.keys
        # The SnapKV-compressed copy the pseudo tokens are drafted on.
        while len(self.copy.layers) <= idx:
            self.copy.layers.append(self.copy.layer_class_to_replicate())
        compact_layer(
            self.copy.layers[idx],
            self.snap.score(inputs),
            inputs.keys,
            inputs.values,
            self.run.budgets[idx],
            self.policy.num_sink,
            n,
        )
        return None  # the full layer stays until the pseudo queries exist

    def finish(self, next_logits):
        model, n = self.run.model, self.run.num_prompt
        token = next_logits.argmax(-1, keepdim=True)

        def record(inputs):
            self.pseudo_queries.setdefault(inputs.index, []).append(inputs.queries(slice(0, 1)))

        with tap_layers(model, record):
            for _ in range(self.policy.num_pseudo):
                logits = model(input_ids=token, past_key_values=self.copy, use_cache=True).logits
                token = logits[:, -1].argmax(-1, keepdim=True)

        scores = {}
        for idx, parts in enumerate(self.run.parts):
            keys = self.full_keys.pop(idx)
            pseudo = self.copy.layers[idx]
            queries = torch.cat([self.prompt_queries[idx], *self.pseudo_queries[idx]], dim=2)
            all_keys = torch.cat([keys[:, :, :n], pseudo.keys[:, :, -self.policy.num_pseudo :]], dim=2)
            scores[idx] = score_queries(queries, all_keys, n - self.window, parts, self.policy.options)
        return scores


@register
class LAQ(Policy):
    """Draft `num_pseudo` greedy tokens on a SnapKV-compressed copy (window `snap_window`, max-pool
    7), then score the full prompt with their queries plus the last `window` prompt queries (max over
    the GQA group, max-pool 7); the window is kept. Needs the full cache alive until the draft is
    done, by construction."""

    name = "laq"

    def __init__(
        self,
        num_pseudo: int = 8,
        window: int = 8,
        snap_window: int = 32,
        pool_kernel: int = 7,
        gqa_reduce: str = "max",
        num_sink: int = DEFAULT_NUM_SINK,
    ):
        super().__init__(num_sink)
        check_int("num_pseudo", num_pseudo, 1)
        check_int("window", window, 0)
        check_int("snap_window", snap_window, 0)
        self.num_pseudo, self.window, self.snap_window = num_pseudo, window, snap_window
        self.options = ScoreOptions(gqa_reduce, pool_kernel, "max")
        self.snap_options = ScoreOptions("mean", pool_kernel, "max")

    def unscored_tail(self, num_prompt):
        # Its window is kept, and the SnapKV-compressed copy it drafts on keeps snap_window, same budget.
        return min(max(self.window, self.snap_window), num_prompt - 1)

    def scorer(self, run):
        return LAQScorer(self, run)
