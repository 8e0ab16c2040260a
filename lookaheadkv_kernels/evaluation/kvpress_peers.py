"""kvpress 0.5.x presses as peers, run on the same captured prefill as the runtime's policies.

kvpress compresses each layer's cache in a forward hook right after that layer's prefill attention,
from the attention's input hidden states, the layer's keys/values and the position embeddings. A
layer's compression never changes what later layers compute during the prefill, so calling
`press.compress` on the captured inputs of every layer reproduces kvpress's own prefill exactly,
without a prefill per press. The budget is matched through kvpress's compression ratio: it keeps
int(N * (1 - ratio)) entries, and ratio = (N - budget - 0.5) / N asks for `budget` whatever the
rounding of the ratio.

Presses at their kvpress defaults: SnapKVPress (window 64, avg-pool 5, GQA mean), StreamingLLMPress
(4 sinks), KnormPress, ExpectedAttentionPress (its own defaults); and this package's press for
kvpress, LookaheadKVPress (`integrations.kvpress`: the runtime's LookaheadKV with uniform budgets),
with the evaluation's lookahead module.
"""

from __future__ import annotations

import importlib
import time

import torch

# "<method>-kvpress": the method as kvpress implements and configures it. The runtime's own
# "snapkv-kvpress" (`SnapKV.kvpress()`) is the same method on the package's kernels; the peer runs
# kvpress's code, so the suite compares against kvpress itself.
PRESSES = {  # name: (module, press class)
    "snapkv-kvpress": ("kvpress", "SnapKVPress"),
    "streamingllm-kvpress": ("kvpress", "StreamingLLMPress"),
    "knorm-kvpress": ("kvpress", "KnormPress"),
    "expected-kvpress": ("kvpress", "ExpectedAttentionPress"),
    "lookaheadkv-kvpress": ("lookaheadkv_kernels.integrations.kvpress", "LookaheadKVPress"),
}


def make_press(name: str, compression_ratio: float, module=None):
    """Press `name` at `compression_ratio`; "lookaheadkv-kvpress" runs lookahead module `module`
    (None: the one shipped for the model)."""
    path, press_class = PRESSES[name]
    press = getattr(importlib.import_module(path), press_class)
    if name == "lookaheadkv-kvpress":
        return press(compression_ratio=compression_ratio, module=module)
    return press(compression_ratio=compression_ratio)


def kvpress_version() -> str:
    """kvpress's version, or ImportError saying why it cannot be used here."""
    import importlib.metadata

    try:
        version = importlib.metadata.version("kvpress")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(
            "kvpress is not installed: pip install --no-deps 'kvpress>=0.5,<0.6' 'cachetools>=5.5,<6' 'fire>=0.6,<0.7' datasets"
        ) from None
    if not version.startswith("0.5."):
        raise ImportError(f"the peers are defined against kvpress 0.5.x, found {version}")
    import kvpress  # noqa: F401  (fails here, with kvpress's own message, if an import dependency is missing)

    return version


@torch.no_grad()
def press_evict(model, prefill, name: str, budget: int, module=None):
    """Compress a copy of `prefill`'s cache with kvpress press `name` to `budget` entries per layer
    (`module`: the lookahead module of "lookaheadkv-kvpress", None for the shipped one).

    Returns the evaluation's `Replay` (the cache, the seconds spent compressing, the bytes kept).
    """
    from ..runtime.cache import CompactedCache, CompactedLayer
    from .replay import Replay

    num_prompt = prefill.num_prompt
    if isinstance(budget, float):
        budget = max(1, round(budget * num_prompt))
    ratio = max(0.0, (num_prompt - budget - 0.5) / num_prompt)
    press = make_press(name, ratio, module)
    start = time.perf_counter()
    cache = CompactedCache()
    positions = torch.arange(num_prompt, device=prefill.input_ids.device)
    cos, sin = model.model.rotary_emb(prefill.hidden[0], positions[None])
    # Entering the press sets up the model the way kvpress does (post_init_from_model, rotary_emb on
    # each attention module); no forward runs inside it, so its hooks never fire.
    with press(model):
        for index, (hidden, full) in enumerate(zip(prefill.hidden, prefill.cache.layers)):
            decoder_layer = model.model.layers[index]
            attention_input = decoder_layer.input_layernorm(hidden)
            kwargs = {
                "hidden_states": attention_input,
                "position_embeddings": (cos, sin),
                "cache_position": positions,
                "attention_mask": None,
            }
            keys, values = press.compress(
                decoder_layer.self_attn, attention_input, full.keys, full.values, None, kwargs
            )
            layer = CompactedLayer()
            layer.replace(keys.contiguous(), values.contiguous(), num_prompt)
            cache.layers.append(layer)
    return Replay(cache, time.perf_counter() - start, cache.nbytes())
