"""kvpress 0.5.x presses: `LookaheadKVPress`, and kvpress's SnapKV-style presses on the fused scoring op.

    from transformers import pipeline
    from lookaheadkv_kernels.integrations.kvpress import LookaheadKVPress
    from lookaheadkv_kernels.runtime import load_model

    model, tokenizer = load_model("smollm2")
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)
    answer = pipe(context, question=question, press=LookaheadKVPress(compression_ratio=0.75))["answer"]

`FusedSnapKVPress` and `FusedPyramidKVPress` are kvpress's SnapKVPress and PyramidKVPress with
their scores computed by the package's `attention_scores` (the window queries' attention, averaged
over the window and each KV head's query heads, avg-pooled) instead of a materialised
[B, Hq, window, N] attention matrix; everything else, the selection included, is kvpress's.

Importing this module imports kvpress, which registers the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from kvpress import PyramidKVPress, ScorerPress, SnapKVPress
from kvpress.utils import compute_n_kept

from .. import attention_scores, select_compact
from ..ops.validation import MAX_POOL_KERNEL
from ..runtime.lookahead import LookaheadModule, project_queries
from ..runtime.models import layer_parts
from ..runtime.policies import LookaheadKV, Run
from ..runtime.tap import LayerInputs


@dataclass
class AttentionInputs(LayerInputs):
    """A layer's inputs as kvpress hands them to a press: `hidden` is the attention's input, already
    normalised by the layer's input norm."""

    def queries(self, rows: slice) -> torch.Tensor:
        return project_queries(self.parts, self.hidden[:, rows], self.cos[:, rows], self.sin[:, rows])


@dataclass
class LookaheadKVPress(ScorerPress):
    """LookaheadKV as a kvpress press: the runtime's `LookaheadKV` scoring, layer by layer in the prefill.

    `module`: the lookahead module (default: the one shipped for the model, as `policy="lookaheadkv"`
    loads it). `options`: LookaheadKV's scoring options (pool_kernel, query_reduce, window_votes,
    num_sink, ...; the runtime's defaults otherwise).

    On the same prompt it keeps exactly the entries the runtime's `LookaheadKV(module, depth_ramp=0)`
    keeps at budget int(N·(1 − compression_ratio)) (kvpress's count). What differs from the runtime's
    defaults and its `generate`:
    - Budgets: kvpress keeps the same count in every layer; the runtime's LookaheadKV spreads its
      budget over depth (`depth_ramp` 0.5, same total). The press always runs depth_ramp 0 (the
      paper's uniform budgets).
    - What is compressed: kvpress's pipeline compresses the context alone and appends the question
      afterwards, so the lookahead rows follow the context and the window votes come from its last
      tokens; `generate` evicts the whole prompt, question included.
    - Order: the kept entries stay in position order (`select_compact`; ties to the lower position),
      where kvpress's ScorerPress keeps top-k order — the same attention either way.
    `score` (for kvpress's wrappers, e.g. AdaKVPress) gives the sinks and any unscored recent tokens
    +inf, so whatever keeps the top scores keeps them. The rows run through the layers in order, so
    one press scores one prefill at a time, as kvpress's hooks call it.
    """

    compression_ratio: float = 0.0
    module: LookaheadModule | None = field(default=None, repr=False, compare=False)
    options: dict = field(default_factory=dict)

    def post_init_from_model(self, model):
        module = self.module if self.module is not None else LookaheadModule.shipped(model)
        self._policy = LookaheadKV(module, depth_ramp=0.0, **self.options)
        self._model, self._parts = model, layer_parts(model)
        self._scorer = None

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        if getattr(self, "_policy", None) is None:
            raise RuntimeError("LookaheadKVPress scores inside `with press(model):` (kvpress's pipeline enters it)")
        index, num_prompt = module.layer_idx, keys.shape[2]
        if index == 0:  # a new prefill: the lookahead rows start again from their embeddings
            budgets = [compute_n_kept(num_prompt, self.compression_ratio)] * len(self._parts)
            self._scorer = self._policy.scorer(Run(self._model, self._parts, num_prompt, 0, budgets, None))
        cos, sin = kwargs["position_embeddings"]
        stored = SimpleNamespace(keys=keys, values=values)
        scored = self._scorer.score(AttentionInputs(index, self._parts[index], hidden_states, cos, sin, stored))
        scores = scored.new_full((*scored.shape[:2], num_prompt), float("inf"))
        sinks = min(self._policy.num_sink, scored.shape[-1])
        scores[..., sinks : scored.shape[-1]] = scored[..., sinks:]
        return scores

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        if self.compression_ratio == 0:
            return keys, values
        scores = self.score(module, hidden_states, keys, values, attentions, kwargs)
        kept_keys, kept_values, _ = select_compact(
            scores, keys, values, compute_n_kept(keys.shape[2], self.compression_ratio)
        )
        return kept_keys, kept_values


class FusedWindowScores:
    """SnapKVPress's `score` through `attention_scores`, for SnapKVPress and its subclasses.

    Falls back to kvpress's own scoring where the op does not apply: attention weights already given,
    or an even or wider pooling kernel than the op's (odd, at most MAX_POOL_KERNEL).
    """

    def post_init_from_model(self, model):
        super().post_init_from_model(model)
        self._parts = layer_parts(model)

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        window, kernel = self.window_size, self.kernel_size
        if attentions is not None or kernel % 2 == 0 or kernel > MAX_POOL_KERNEL:
            return super().score(module, hidden_states, keys, values, attentions, kwargs)
        if hidden_states.shape[1] <= window:
            raise ValueError(f"query length {hidden_states.shape[1]} must exceed the window size {window}")
        cos, sin = kwargs["position_embeddings"]
        last = slice(-window, None)
        queries = project_queries(self._parts[module.layer_idx], hidden_states[:, last], cos[:, last], sin[:, last])
        scores = attention_scores(
            queries,
            keys,
            num_scored=keys.shape[2] - window,
            scale=module.head_dim**-0.5,  # kvpress's scale, whatever the model's own
            gqa_reduce="mean",
            pool_kernel=kernel,
            pool_type="avg",
        )
        # The window itself above every scored key, as kvpress keeps it.
        return F.pad(scores, (0, window), value=scores.max().item() + 1)


@dataclass
class FusedSnapKVPress(FusedWindowScores, SnapKVPress):
    """kvpress's SnapKVPress (window_size 64, kernel_size 5 by default), scored by the fused op."""


@dataclass
class FusedPyramidKVPress(FusedWindowScores, PyramidKVPress):
    """kvpress's PyramidKVPress (SnapKV scores, budgets falling over depth), scored by the fused op."""
