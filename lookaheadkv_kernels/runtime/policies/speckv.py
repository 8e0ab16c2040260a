"""SpecKV (Galim et al., 2025, "Draft-based Approximate Inference for LLMs")."""

from __future__ import annotations

from ...ops.validation import check_int
from .base import DEFAULT_NUM_SINK, greedy_continuation, register
from .snapkv import SnapKV


@register
class SpecKV(SnapKV):
    """A draft model writes `num_draft` greedy tokens; the target scores the prompt with the draft's
    queries plus the last `window` prompt queries (max over the GQA group, max-pool 7).

    `draft_model` is any HF causal LM with the target's vocabulary; None uses the target itself.
    """

    name = "speckv"
    appends_rows = True

    def __init__(
        self,
        draft_model=None,
        num_draft: int = 32,
        window: int = 32,
        pool_kernel: int = 7,
        pool_type: str = "max",
        gqa_reduce: str = "max",
        num_sink: int = DEFAULT_NUM_SINK,
    ):
        super().__init__(window, pool_kernel, pool_type, gqa_reduce, num_sink)
        check_int("num_draft", num_draft, 1)
        self.draft_model = draft_model
        self.num_draft = num_draft

    def extra_tokens(self, model, input_ids, max_new_tokens):
        drafter = model if self.draft_model is None else self.draft_model
        if drafter.config.vocab_size != model.config.vocab_size:
            raise ValueError(
                f"SpecKV draft model has vocab_size {drafter.config.vocab_size}, the target {model.config.vocab_size}: "
                "the draft must share the target's tokenizer"
            )
        return greedy_continuation(drafter, input_ids, self.num_draft)
