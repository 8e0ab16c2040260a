"""A DynamicCache whose layers may hold fewer entries than the positions they stand for.

After eviction a layer stores M ≤ N of the prompt's N entries, yet the next token sits at position
N, not M. Each layer therefore counts its evicted positions: `get_seq_length()` reports the true
length (so `generate` and the models derive cache_position / position ids N, N+1, ...), while
`get_mask_sizes()` reports the stored length plus the new queries, offset by the evicted count, so
the masks HF builds have one column per stored key. Layers may be evicted to different lengths
(PyramidKV); `ragged_masks` then fits each layer's 4-D mask to its own key count.

Batched decoding (`stack_caches`, `padded_masks`): the compacted caches of several prompts, one
batch row each, right-aligned per layer and left-padded to the longest row, the padding hidden from
every query by the mask.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from .. import select_compact


class CompactedLayer(DynamicLayer):
    """A DynamicLayer that remembers how many positions before its stored entries were evicted."""

    def __init__(self):
        super().__init__()
        self.evicted = 0

    def stored_length(self) -> int:
        return DynamicLayer.get_seq_length(self)

    def get_seq_length(self) -> int:
        return self.stored_length() + self.evicted

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        # The stored keys stand for the positions evicted..evicted+stored-1 as far as the mask is concerned:
        # every one of them precedes every new query, so all are visible, as they must be.
        return self.stored_length() + cache_position.shape[0], self.evicted

    def crop(self, max_length: int) -> None:
        """Crop to `max_length` true positions (negative: drop that many); evicted prompt entries stay evicted."""
        if max_length < 0:
            max_length = self.get_seq_length() + max_length
        if max_length < self.evicted:
            raise ValueError(f"cannot crop to {max_length} positions: the first {self.evicted} were evicted")
        DynamicLayer.crop(self, max_length - self.evicted)

    def replace(self, keys: torch.Tensor, values: torch.Tensor, num_positions: int) -> None:
        """Store `keys`/`values` [B, Hkv, M, D] as the compacted form of the first `num_positions` positions."""
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values
        self.evicted = num_positions - keys.shape[-2]


class CompactedCache(DynamicCache):
    """DynamicCache of CompactedLayers; behaves exactly like a DynamicCache until a layer is compacted."""

    def __init__(self):
        Cache.__init__(self, layer_class_to_replicate=CompactedLayer)

    def stored_lengths(self) -> list[int]:
        return [layer.stored_length() for layer in self.layers]

    def nbytes(self) -> int:
        """Bytes held by the stored keys and values of every layer."""
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.layers if layer.is_initialized)

    def is_ragged(self) -> bool:
        return len(set(self.stored_lengths())) > 1


def compact_layer(
    target: CompactedLayer,
    scores: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    budget: int,
    num_sink: int,
    num_prompt: int,
) -> torch.Tensor:
    """Store in `target` the `budget` best of the first `num_prompt` entries of keys/values; return `kept`.

    Entries after the prompt (lookahead or draft rows) are dropped. The one compaction path of the
    runtime: every policy's scores end here.
    """
    k_out, v_out, kept = select_compact(
        scores, keys[:, :, :num_prompt], values[:, :, :num_prompt], budget, num_sink=num_sink
    )
    target.replace(k_out, v_out, num_prompt)
    return kept


def _fit_mask(mask: torch.Tensor, num_keys: int) -> torch.Tensor:
    """`mask` [B, 1, Tq, K'] built for another layer's key count, fitted to `num_keys` keys.

    Columns are aligned at the right (the newest keys); columns added on the left are old prompt
    entries that every query may see.
    """
    have = mask.shape[-1]
    if have >= num_keys:
        return mask[..., have - num_keys :]
    visible = True if mask.dtype == torch.bool else 0.0
    pad = mask.new_full((*mask.shape[:-1], num_keys - have), visible)
    return torch.cat([pad, mask], dim=-1)


@contextmanager
def ragged_masks(model):
    """While active, each attention layer receives a mask fitted to its own cache length.

    HF builds one mask per forward from layer 0's sizes; with per-layer budgets the layers hold
    different numbers of keys. Needed whenever a mask is materialised (eager attention, or several
    queries at once); SDPA decoding one token at a time builds none.
    """

    def fit(module, args, kwargs):
        mask, cache = kwargs.get("attention_mask"), kwargs.get("past_key_values")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or not isinstance(cache, CompactedCache):
            return None
        layer_idx = module.layer_idx
        stored = cache.layers[layer_idx].stored_length() if layer_idx < len(cache.layers) else 0
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        kwargs["attention_mask"] = _fit_mask(mask, stored + hidden.shape[1])
        return args, kwargs

    handles = [layer.self_attn.register_forward_pre_hook(fit, with_kwargs=True) for layer in model.model.layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def stack_caches(caches: list[CompactedCache]) -> tuple[CompactedCache, list[torch.Tensor]]:
    """One cache for a batch of single-row caches, and per layer the padded entries [B] of each row.

    Layer l of row b holds row b's stored entries at the right end, after `pads[l][b]` zero entries.
    The positions are not stored (a key's position is in its rotation), so the rows' true lengths
    may differ: decoding passes each row's position ids. The stacked layers count no evicted
    positions; their length is the stored width.
    """
    stacked, pads = CompactedCache(), []
    for layers in zip(*(cache.layers for cache in caches)):
        width = max(layer.stored_length() for layer in layers)
        pads.append(torch.tensor([width - layer.stored_length() for layer in layers], device=layers[0].keys.device))

        def padded(t):
            return F.pad(t, (0, 0, width - t.shape[2], 0))

        layer = CompactedLayer()
        layer.replace(torch.cat([padded(x.keys) for x in layers]), torch.cat([padded(x.values) for x in layers]), width)
        stacked.layers.append(layer)
    return stacked, pads


@contextmanager
def padded_masks(model, cache: CompactedCache, pads: list[torch.Tensor]):
    """While active, attention layer l hides the first `pads[l][b]` keys of `cache` from row b's query.

    For decoding one token per row on a `stack_caches` cache: each layer gets its own additive mask
    [B, 1, 1, keys] (so ragged layers need no other fitting), zero where a row may look.
    """

    def hide(module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if hidden.shape[1] != 1:
            raise ValueError(f"padded_masks decodes one token per row, got {hidden.shape[1]}")
        pad = pads[module.layer_idx]
        keys = cache.layers[module.layer_idx].stored_length() + 1  # with the key this step adds
        hidden_keys = torch.arange(keys, device=pad.device)[None, :] < pad[:, None]
        mask = torch.zeros(len(pad), 1, 1, keys, dtype=hidden.dtype, device=hidden.device)
        kwargs["attention_mask"] = mask.masked_fill(hidden_keys[:, None, None, :], torch.finfo(hidden.dtype).min)
        return args, kwargs

    handles = [layer.self_attn.register_forward_pre_hook(hide, with_kwargs=True) for layer in model.model.layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
