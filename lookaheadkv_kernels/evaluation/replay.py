"""Prefill a prompt once, then evict copies of its cache with any number of policies and budgets.

The runtime's `prefill_and_evict` scores each layer while the prefill passes through it; that costs
a whole prefill per (policy, budget), which on a CPU is most of an evaluation's time (SmolLM2 fills
~240 tokens/s: an 8K prompt takes ~35 s). `capture_prefill` runs the model's prefill once and keeps
what a policy reads from it — every layer's input rows and K/V, the next-token logits — and `evict`
hands a copy to the runtime's `evict_cache`.

`evict_cache` refuses policies that score with rows prefilled after the prompt (SpecKV's draft,
Oracle's answer). For those, the rows are run as a continuation of the captured cache (the same rows
a joint prefill of prompt + rows computes) and fed through the runtime's evictor exactly as its
prefill tap would, layer by layer. Their rows are the target's greedy full-cache continuation, which
the caller usually has decoded already (`continuation`): then no prompt is prefilled twice.

`evict` times the eviction work only (scoring, compaction, the appended rows' forward); a draft
taken from `continuation` costs nothing here. `lookaheadkv bench-evict` measures the runtime's real
end-to-end prefill + eviction instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..runtime.cache import CompactedCache, CompactedLayer, ragged_masks
from ..runtime.eviction import _Evictor, eos_ids, evict_cache
from ..runtime.models import layer_parts
from ..runtime.policies import Oracle, SpecKV, make_policy
from ..runtime.tap import LayerInputs


@dataclass
class Prefill:
    """One full-cache prefill of a prompt, with everything a policy's scorer reads from it."""

    input_ids: torch.Tensor  # [1, N]
    cache: DynamicCache  # the prompt's full cache; never modified
    hidden: list[torch.Tensor]  # per layer [1, N, hidden]: the decoder layer's input rows
    next_logits: torch.Tensor  # [1, vocab]
    seconds: float

    @property
    def num_prompt(self) -> int:
        return self.input_ids.shape[1]

    def full_cache(self) -> CompactedCache:
        """A cache holding the full prompt K/V, sharing its tensors (decoding appends new ones, never writes into them)."""
        cache = CompactedCache()
        for layer in self.cache.layers:
            cache.layers.append(CompactedLayer())
            cache.layers[-1].replace(layer.keys, layer.values, self.num_prompt)
        return cache

    def full_cache_bytes(self) -> int:
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.cache.layers)


def _forward(model, input_ids: torch.Tensor, cache):
    """(last logits [1, vocab], every decoder layer's input rows) of `input_ids` run on `cache`."""
    out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, output_hidden_states=True, logits_to_keep=1)
    return out.logits[:, -1], list(out.hidden_states[: len(model.model.layers)])


@torch.no_grad()
def capture_prefill(model, input_ids: torch.Tensor) -> Prefill:
    """Run the model's own prefill of `input_ids` [1, N] once and keep what every policy needs."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"capture_prefill takes one prompt [1, N], got shape {tuple(input_ids.shape)}")
    start = time.perf_counter()
    cache = DynamicCache()
    next_logits, hidden = _forward(model, input_ids, cache)
    return Prefill(input_ids, cache, hidden, next_logits, time.perf_counter() - start)


@dataclass
class Replay:
    cache: CompactedCache
    seconds: float  # the eviction work, the shared prefill excluded
    kept_bytes: int  # K/V bytes the evicted cache holds


def _appended_rows(policy, model, prefill: Prefill, continuation: torch.Tensor | None, max_new_tokens: int | None):
    """The rows [1, E] the policy appends after the prompt: what its `extra_tokens` returns.

    SpecKV drafting with the target itself and Oracle both take the target's greedy full-cache
    continuation (`greedy_continuation`, which stops at EOS); its prefix is that, when the caller
    has decoded enough of it.
    """
    if continuation is not None:
        if isinstance(policy, SpecKV) and policy.draft_model is None:
            length = policy.num_draft
        elif isinstance(policy, Oracle):
            length = policy.max_answer_tokens or max_new_tokens or 512
        else:
            length = None
        stopped = continuation.shape[1] > 0 and int(continuation[0, -1]) in eos_ids(model)
        if length is not None and (continuation.shape[1] >= length or stopped):
            return continuation[:, :length]
    return policy.extra_tokens(model, prefill.input_ids, max_new_tokens)


def _evict_with_rows(model, prefill: Prefill, policy, budget, max_new_tokens, continuation):
    evictor = _Evictor(model, policy, budget, prefill.num_prompt, prefill.input_ids.device, max_new_tokens)
    if not evictor.evicting:
        evictor.cache = prefill.full_cache()
        return evictor.finish(prefill.next_logits)
    extra = _appended_rows(evictor.policy, model, prefill, continuation, max_new_tokens).to(prefill.input_ids.device)
    cache = prefill.full_cache()
    _, extra_hidden = _forward(model, extra, cache)
    hidden = [torch.cat([h, e], dim=1) for h, e in zip(prefill.hidden, extra_hidden)]
    positions = torch.arange(hidden[0].shape[1], device=extra.device)[None]
    cos, sin = model.model.rotary_emb(hidden[0], positions)
    evictor.cache = cache
    evictor.begin(extra.shape[1])
    for idx, parts in enumerate(layer_parts(model)):
        evictor.layer(LayerInputs(idx, parts, hidden[idx], cos, sin, cache.layers[idx]))
    return evictor.finish(prefill.next_logits)


@torch.no_grad()
def evict(
    model,
    prefill: Prefill,
    policy,
    budget,
    *,
    max_new_tokens: int | None = None,
    continuation: torch.Tensor | None = None,
) -> Replay:
    """Evict a copy of `prefill`'s cache with `policy` (a Policy or a name) to `budget`.

    The result equals the cache `prefill_and_evict(model, prefill.input_ids, policy, budget)` returns.
    `continuation`: the full-cache greedy answer tokens [1, T], if known (SpecKV's self-draft and
    Oracle's answer are its prefix).
    """
    policy = make_policy(policy)
    start = time.perf_counter()
    if policy.appends_rows:
        eviction = _evict_with_rows(model, prefill, policy, budget, max_new_tokens, continuation)
    else:
        eviction = evict_cache(model, prefill.cache, prefill.hidden, prefill.next_logits, policy, budget)
    return Replay(eviction.cache, time.perf_counter() - start, eviction.cache.nbytes())


@torch.no_grad()
def decode(model, prefill: Prefill, cache: CompactedCache, max_new_tokens: int, streamer=None) -> torch.Tensor:
    """Greedy answer tokens [1, <=max_new_tokens] on `cache`; the first comes from the full prefill's logits.

    `streamer`: a transformers streamer (`put(ids)`, `end()`), handed to `generate` to see the tokens
    as they come; its first `put` is the prompt and the first answer token."""
    first = prefill.next_logits.argmax(-1, keepdim=True)
    if max_new_tokens == 1 or int(first) in eos_ids(model):
        return first
    ids = torch.cat([prefill.input_ids, first], dim=1)
    with ragged_masks(model):
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            past_key_values=cache,
            max_new_tokens=max_new_tokens - 1,
            do_sample=False,
            streamer=streamer,
        )
    return out[:, prefill.num_prompt :]
