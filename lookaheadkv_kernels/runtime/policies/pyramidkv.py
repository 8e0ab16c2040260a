"""PyramidKV (Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling")."""

from __future__ import annotations

from ...ops.validation import check_int
from .base import register
from .snapkv import SnapKV


@register
class PyramidKV(SnapKV):
    """SnapKV's scores with budgets falling linearly over depth, averaging `budget`: KVCache-Factory's
    schedule with `beta` 20. `snapkv` options go to SnapKV."""

    name = "pyramidkv"

    def __init__(self, beta: int = 20, **snapkv):
        super().__init__(**snapkv)
        check_int("beta", beta, 1)
        self.beta = beta

    def layer_budgets(self, budget, num_prompt, num_layers):
        window = self.unscored_tail(num_prompt)
        selectable = budget - window
        if budget >= num_prompt or selectable <= 0 or num_layers == 1:  # short prompts are left alone
            return [budget] * num_layers
        # KVCache-Factory's schedule: min = (C - w) / beta, max = 2 (C - w) - min, linear over depth;
        # never below the protected sinks, which the original does not have.
        smallest = selectable // self.beta
        largest = 2 * selectable - smallest
        step = (largest - smallest) // (num_layers - 1)
        return [max(self.num_sink, 1, largest - i * step) + window for i in range(num_layers)]
