"""Forward hooks on the decoder layers: a callback sees each layer's inputs right after it has run.

This is how eviction interleaves with the model's own prefill: when layer l has run, its cache holds
the prompt's K/V, and its input hidden states and position embeddings give any queries a policy
needs; layer l is evicted before layer l+1 starts.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .lookahead import project_queries
from .models import LayerParts, layer_parts


@dataclass
class LayerInputs:
    """What is known when decoder layer `index` has just run over T rows."""

    index: int
    parts: LayerParts
    hidden: torch.Tensor  # [B, T, hidden]: the layer's input for those rows
    cos: torch.Tensor  # [B or 1, T, D]: their HF position embeddings
    sin: torch.Tensor
    cache_layer: object  # the layer's cache entry, holding every stored key with these rows last

    @property
    def keys(self) -> torch.Tensor:
        return self.cache_layer.keys

    @property
    def values(self) -> torch.Tensor:
        return self.cache_layer.values

    def queries(self, rows: slice) -> torch.Tensor:
        """Rotated queries [B, Hq, r, D] of `rows` of these rows (plain weights, no LoRA)."""
        x = self.parts.layer.input_layernorm(self.hidden[:, rows])
        return project_queries(self.parts, x, self.cos[:, rows], self.sin[:, rows])


@contextmanager
def tap_layers(model, callback: Callable[[LayerInputs], None]):
    """Call `callback(LayerInputs)` after every decoder layer's forward while the context is active."""
    parts = layer_parts(model)

    def make_hook(index):
        def hook(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            cos, sin = kwargs["position_embeddings"]
            cache = kwargs["past_key_values"]
            callback(LayerInputs(index, parts[index], hidden, cos, sin, cache.layers[index]))

        return hook

    handles = [p.layer.register_forward_hook(make_hook(i), with_kwargs=True) for i, p in enumerate(parts)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
