"""Oracle: the upper bound every policy is measured against."""

from __future__ import annotations

from .base import DEFAULT_NUM_SINK, greedy_continuation, register
from .snapkv import SnapKV


@register
class Oracle(SnapKV):
    """The queries of the model's own full-cache greedy answer score all prompt keys (no window, no
    pooling, GQA mean).

    The answer has the generation's max_new_tokens (or `max_answer_tokens`, default 512 when the
    caller does not say).
    """

    name = "oracle"
    appends_rows = True

    def __init__(
        self, max_answer_tokens: int | None = None, gqa_reduce: str = "mean", num_sink: int = DEFAULT_NUM_SINK
    ):
        super().__init__(window=0, pool_kernel=1, pool_type="max", gqa_reduce=gqa_reduce, num_sink=num_sink)
        self.max_answer_tokens = max_answer_tokens

    def extra_tokens(self, model, input_ids, max_new_tokens):
        length = self.max_answer_tokens or max_new_tokens or 512
        return greedy_continuation(model, input_ids, length)
