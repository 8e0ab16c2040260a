"""The eviction flow: prefill with the model's own attention, evict each layer as soon as its scores
exist, then decode with ordinary `generate` on the compacted cache at the true positions.

Lower level (`prefill_and_evict`): for runtimes that drive their own decoding; returns the compacted
cache (a `CompactedCache`, whose `get_seq_length()` is the true position of the next token) and the
next-token logits of the prompt. Higher level (`generate`): one call from a prompt to the answer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Sequence

import torch

from .cache import CompactedCache, compact_layer, ragged_masks
from .models import layer_parts, sliding_window
from .policies import Policy, Run, make_policy
from .tap import tap_layers


@dataclass
class EvictionStats:
    """What an eviction did, measured."""

    policy: str
    num_prompt: int
    budgets: list[int]
    kept: list[int]  # entries per layer afterwards
    full_cache_bytes: int  # the prompt's K/V over all layers, as a full-cache prefill holds it
    peak_cache_bytes: int  # most K/V bytes alive at once during the prefill (cache + pending layer)
    seconds: float
    peak_device_bytes: int | None = None  # torch.cuda.max_memory_allocated during the prefill, on CUDA


@dataclass
class Eviction:
    cache: CompactedCache
    next_logits: torch.Tensor  # [B, vocab]: logits of the token after the prompt (from the full prefill)
    stats: EvictionStats
    kept: list[torch.Tensor | None] = field(default_factory=list)  # per layer [B, Hkv, M] positions, None = all


def resolve_budget(budget, num_prompt: int, num_layers: int) -> int | list[int]:
    """A budget as entries per layer: an int token count, a float ratio of the prompt in (0, 1], or
    one int per layer. Ratios round to the nearest count, at least 1."""
    if isinstance(budget, bool):
        raise TypeError(f"budget must be an int, a float ratio or a list of ints, got {budget!r}")
    if isinstance(budget, Integral):
        if budget < 1:
            raise ValueError(f"budget must be >= 1 token, got {budget}")
        return int(budget)
    if isinstance(budget, Real):
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"a float budget is a ratio of the prompt and must be in (0, 1], got {budget}")
        return max(1, round(float(budget) * num_prompt))
    if isinstance(budget, Sequence) and not isinstance(budget, str):
        if len(budget) != num_layers:
            raise ValueError(f"a per-layer budget needs {num_layers} entries (one per layer), got {len(budget)}")
        resolved = [resolve_budget(b, num_prompt, num_layers) for b in budget]
        if any(isinstance(b, list) for b in resolved):
            raise TypeError("per-layer budgets must be numbers")
        return resolved
    raise TypeError(f"budget must be an int, a float ratio or a list of ints, got {type(budget).__name__}")


def _check_prompt(model, input_ids, max_new_tokens):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be a [batch, length>=1] tensor, got {getattr(input_ids, 'shape', input_ids)}")
    window = sliding_window(model.config)
    total = input_ids.shape[1] + (max_new_tokens or 0)
    if window is not None and total > window:
        raise ValueError(
            f"the model uses sliding-window attention (window {window}); prompt + new tokens = {total} exceed it, "
            "which the runtime does not support"
        )


@torch.no_grad()
def prefill_and_evict(model, input_ids: torch.Tensor, policy, budget, *, max_new_tokens: int | None = None) -> Eviction:
    """Prefill `input_ids` [B, N] (no padding) and evict every layer's prompt cache to `budget`.

    `policy`: a Policy or a policy name. `budget`: see `resolve_budget`; a prompt no longer than
    the budget is left alone. `max_new_tokens` tells policies that draft an answer (Oracle) how long
    it is. The lookahead / draft rows never enter the returned cache.
    """
    policy = make_policy(policy)
    parts = layer_parts(model)
    _check_prompt(model, input_ids, max_new_tokens)
    num_prompt, num_layers = input_ids.shape[1], len(parts)
    resolved = resolve_budget(budget, num_prompt, num_layers)
    budgets = list(resolved) if isinstance(resolved, list) else policy.layer_budgets(resolved, num_prompt, num_layers)
    cuda = input_ids.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(input_ids.device)
    start = time.perf_counter()

    cache = CompactedCache()
    evicting = any(b < num_prompt for b in budgets)
    extra = policy.extra_tokens(model, input_ids, max_new_tokens) if evicting else None
    prefill_ids = input_ids if extra is None else torch.cat([input_ids, extra.to(input_ids.device)], dim=1)
    run = Run(model, parts, num_prompt, prefill_ids.shape[1] - num_prompt, budgets, max_new_tokens)
    kept: list[torch.Tensor | None] = [None] * num_layers
    peak = 0

    def evict(inputs):
        nonlocal peak
        peak = max(peak, cache.nbytes())  # this layer full, the earlier ones already compacted
        scores = scorer.score(inputs)
        if scores is not None:
            idx = inputs.index
            kept[idx] = compact_layer(
                inputs.cache_layer, scores, inputs.keys, inputs.values, budgets[idx], policy.num_sink, num_prompt
            )

    if evicting:
        scorer = policy.scorer(run)
        with tap_layers(model, evict):
            next_logits = _prefill(model, prefill_ids, cache, num_prompt)
        for idx, scores in scorer.finish(next_logits).items():
            layer = cache.layers[idx]
            peak = max(peak, cache.nbytes())
            kept[idx] = compact_layer(layer, scores, layer.keys, layer.values, budgets[idx], policy.num_sink, num_prompt)
    else:
        next_logits = _prefill(model, prefill_ids, cache, num_prompt)
    peak = max(peak, cache.nbytes())

    first = cache.layers[0].keys
    per_position = first.shape[0] * first.shape[1] * first.shape[3] * first.element_size() * 2
    stats = EvictionStats(
        policy=policy.name,
        num_prompt=num_prompt,
        budgets=budgets,
        kept=cache.stored_lengths(),
        full_cache_bytes=per_position * num_prompt * num_layers,
        peak_cache_bytes=peak,
        seconds=time.perf_counter() - start,
        peak_device_bytes=torch.cuda.max_memory_allocated(input_ids.device) if cuda else None,
    )
    return Eviction(cache, next_logits, stats, kept)


def _prefill(model, ids, cache, num_prompt):
    """The model's own forward over ids; returns the logits [B, vocab] after the prompt's last token."""
    last = torch.tensor([num_prompt - 1], device=ids.device)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=last)
    return out.logits[:, -1]


@dataclass
class GenerationResult:
    text: str | None
    token_ids: list[int]  # the new tokens
    prompt_ids: torch.Tensor
    eviction: EvictionStats


def _eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in ([eos] if isinstance(eos, int) else eos)}


def encode_prompt(tokenizer, prompt, chat: bool | None, device) -> torch.Tensor:
    """Token ids [1, N] of a prompt: a string, a list of chat messages, or ids already.

    Chat formatting (the tokenizer's template with the assistant turn opened) applies to message
    lists, and to strings unless chat=False; the template's text already has its special tokens,
    so it is encoded with add_special_tokens=False.
    """
    if isinstance(prompt, torch.Tensor):
        ids = prompt if prompt.dim() == 2 else prompt[None]
        return ids.to(device)
    if tokenizer is None:
        raise ValueError("a text or chat prompt needs a tokenizer")
    if isinstance(prompt, str) and chat is False:
        return tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    if chat is False:
        raise ValueError("chat=False needs a string prompt")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if tokenizer.chat_template is None:
        if chat:
            raise ValueError("the tokenizer has no chat template; pass chat=False for plain text")
        return tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to(device)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompt,
    *,
    policy="snapkv",
    budget=128,
    max_new_tokens: int = 64,
    chat: bool | None = None,
    **policy_options,
) -> GenerationResult:
    """Greedy answer to `prompt` after evicting the prompt's KV cache with `policy` to `budget`.

    prompt: a string (chat-formatted when the tokenizer has a template, unless chat=False), a list
    of chat messages, or token ids [1, N]. policy: a Policy or a name (options as keywords, e.g.
    policy="snapkv", window=64). budget: tokens (int), a ratio of the prompt (float), or one int per
    layer. With a budget >= the prompt length the tokens equal full-cache greedy `generate`'s.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    device = next(model.parameters()).device
    input_ids = encode_prompt(tokenizer, prompt, chat, device)
    if input_ids.shape[0] != 1:
        raise ValueError(f"generate takes one prompt, got a batch of {input_ids.shape[0]}; use prefill_and_evict")
    eviction = prefill_and_evict(model, input_ids, make_policy(policy, **policy_options), budget, max_new_tokens=max_new_tokens)

    first = eviction.next_logits.argmax(-1, keepdim=True)  # from the full prefill, as in full-cache decoding
    tokens = [int(first)]
    if max_new_tokens > 1 and tokens[0] not in _eos_ids(model):
        ids = torch.cat([input_ids, first], dim=1)
        with ragged_masks(model):
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                past_key_values=eviction.cache,
                max_new_tokens=max_new_tokens - 1,
                do_sample=False,
            )
        tokens += out[0, ids.shape[1] :].tolist()
    text = tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else None
    return GenerationResult(text, tokens, input_ids, eviction.stats)
