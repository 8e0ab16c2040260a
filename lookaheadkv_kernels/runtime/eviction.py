"""The eviction flow: prefill with the model's own attention, evict each layer as soon as its scores
exist, then decode with ordinary `generate` on the compacted cache at the true positions.

Lower level, for runtimes that drive their own decoding: `prefill_and_evict` (prefill and evict in
one pass) and `evict_cache` (evict a cache the runtime prefilled); both return the compacted cache
(a `CompactedCache`, whose `get_seq_length()` is the true position of the next token) and the
next-token logits of the prompt. Higher level (`generate`): one call from a prompt, or a list of
prompts, to the answers.

A batch is evicted per prompt (each prompt prefilled and evicted alone, exactly as on its own), then
decoded together: the compacted caches are stacked into one batch cache, each row left-padded to the
longest per layer with the padding masked (`stack_caches`, `padded_masks`), and every row decodes at
its own true positions. So prompts of any lengths batch, and each gets the tokens it gets alone.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real

import torch

from ..ops.validation import check_int
from .cache import CompactedCache, CompactedLayer, compact_layer, padded_masks, ragged_masks, stack_caches
from .models import layer_parts, sliding_window
from .policies import Policy, Run, make_policy
from .tap import LayerInputs, tap_layers


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


def _check_window(model, num_prompt: int, max_new_tokens: int | None):
    window = sliding_window(model.config)
    total = num_prompt + (max_new_tokens or 0)
    if window is not None and total > window:
        raise ValueError(
            f"the model uses sliding-window attention (window {window}); prompt + new tokens = {total} exceed it, "
            "which the runtime does not support"
        )


class _Evictor:
    """Compacts the layers of one CompactedCache as their scores arrive, and measures the eviction."""

    def __init__(self, model, policy, budget, num_prompt: int, device: torch.device, max_new_tokens: int | None):
        self.model, self.policy = model, make_policy(policy, model=model)
        self.parts = layer_parts(model)
        self.num_prompt, self.max_new_tokens = num_prompt, max_new_tokens
        num_layers = len(self.parts)
        resolved = resolve_budget(budget, num_prompt, num_layers)
        self.budgets = (
            list(resolved)
            if isinstance(resolved, list)
            else self.policy.layer_budgets(resolved, num_prompt, num_layers)
        )
        self.evicting = any(b < num_prompt for b in self.budgets)  # a prompt within budget is left alone
        floor, tail = self.policy.always_kept(num_prompt), self.policy.unscored_tail(num_prompt)
        if any(floor > b < num_prompt for b in self.budgets):  # checked before the prefill, not in its middle
            raise ValueError(
                f"budget {budget!r} is below the {floor} entries per layer {self.policy.name} always keeps of this "
                f"{num_prompt}-token prompt ({floor - tail} sinks + a {tail}-token window): raise the budget"
            )
        self.cache = CompactedCache()
        self.kept: list[torch.Tensor | None] = [None] * num_layers
        self.peak = 0
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.start = time.perf_counter()
        self.scorer = None

    def begin(self, num_extra: int) -> None:
        self.scorer = self.policy.scorer(
            Run(self.model, self.parts, self.num_prompt, num_extra, self.budgets, self.max_new_tokens)
        )

    def _compact(self, idx, scores, keys, values):
        self.kept[idx] = compact_layer(
            self.cache.layers[idx], scores, keys, values, self.budgets[idx], self.policy.num_sink, self.num_prompt
        )

    def layer(self, inputs) -> None:
        """Score and compact the layer that has just run (called from the layer tap)."""
        self.peak = max(self.peak, self.cache.nbytes())  # this layer full, the earlier ones compacted
        scores = self.scorer.score(inputs)
        if scores is not None:
            self._compact(inputs.index, scores, inputs.keys, inputs.values)

    def finish(self, next_logits: torch.Tensor) -> Eviction:
        if self.scorer is not None:
            for idx, scores in self.scorer.finish(next_logits).items():
                self.peak = max(self.peak, self.cache.nbytes())
                layer = self.cache.layers[idx]
                self._compact(idx, scores, layer.keys, layer.values)
        self.peak = max(self.peak, self.cache.nbytes())
        first = self.cache.layers[0].keys
        per_position = first.shape[0] * first.shape[1] * first.shape[3] * first.element_size() * 2
        stats = EvictionStats(
            policy=self.policy.name,
            num_prompt=self.num_prompt,
            budgets=self.budgets,
            kept=self.cache.stored_lengths(),
            full_cache_bytes=per_position * self.num_prompt * len(self.parts),
            peak_cache_bytes=self.peak,
            seconds=time.perf_counter() - self.start,
            peak_device_bytes=torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None,
        )
        return Eviction(self.cache, next_logits, stats, self.kept)


@torch.no_grad()
def prefill_and_evict(model, input_ids: torch.Tensor, policy, budget, *, max_new_tokens: int | None = None) -> Eviction:
    """Prefill `input_ids` [B, N] (no padding) and evict every layer's prompt cache to `budget`.

    `policy`: a Policy or a policy name. `budget`: see `resolve_budget`; a prompt no longer than
    the budget is left alone. `max_new_tokens` tells policies that draft an answer (Oracle) how long
    it is. Each layer is evicted right after the prefill has run through it (LAQ alone needs the
    full cache until its draft is done). The lookahead / draft rows never enter the returned cache.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be a [batch, length>=1] tensor, got {getattr(input_ids, 'shape', input_ids)}")
    num_prompt = input_ids.shape[1]
    _check_window(model, num_prompt, max_new_tokens)
    evictor = _Evictor(model, policy, budget, num_prompt, input_ids.device, max_new_tokens)
    if not evictor.evicting:
        return evictor.finish(_prefill(model, input_ids, evictor.cache, num_prompt))
    extra = evictor.policy.extra_tokens(model, input_ids, max_new_tokens)
    prefill_ids = input_ids if extra is None else torch.cat([input_ids, extra.to(input_ids.device)], dim=1)
    evictor.begin(prefill_ids.shape[1] - num_prompt)
    with tap_layers(model, evictor.layer):
        next_logits = _prefill(model, prefill_ids, evictor.cache, num_prompt)
    return evictor.finish(next_logits)


@torch.no_grad()
def evict_cache(model, cache, hidden_states, next_logits: torch.Tensor, policy, budget) -> Eviction:
    """Evict a cache that a runtime has already prefilled with the prompt (and nothing else).

    cache: the prompt's full cache (an HF Cache with `.layers`, e.g. DynamicCache), left untouched;
    hidden_states: the inputs of every decoder layer over the prompt, i.e. the `hidden_states` a
    forward returns with output_hidden_states=True (entry l is layer l's input); next_logits: the
    logits [B, vocab] after the prompt. Returns a new CompactedCache (positions stay true). Policies
    that prefill draft rows after the prompt (SpecKV, Oracle) need `prefill_and_evict` instead.
    """
    first = cache.layers[0].keys
    num_prompt = first.shape[2]
    _check_window(model, num_prompt, None)
    evictor = _Evictor(model, policy, budget, num_prompt, first.device, None)
    if evictor.policy.appends_rows:
        raise ValueError(
            f"{evictor.policy.name} scores with draft rows prefilled after the prompt; use prefill_and_evict"
        )
    for layer in cache.layers:
        evictor.cache.layers.append(CompactedLayer())
        evictor.cache.layers[-1].replace(layer.keys, layer.values, num_prompt)
    if evictor.evicting:
        evictor.begin(0)
        positions = torch.arange(num_prompt, device=first.device)[None]
        cos, sin = model.model.rotary_emb(hidden_states[0], positions)
        for idx, parts in enumerate(evictor.parts):
            evictor.layer(LayerInputs(idx, parts, hidden_states[idx], cos, sin, evictor.cache.layers[idx]))
    return evictor.finish(next_logits)


def _prefill(model, ids, cache, num_prompt):
    """The model's own forward over ids; returns the logits [B, vocab] after the prompt's last token."""
    last = torch.tensor([num_prompt - 1], device=ids.device)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=last)
    return out.logits[:, -1]


class _FullCache(Policy):
    """generate's policy="full": nothing evicted, every prompt kept whole (its budget is all of it),
    so the tokens are full-cache greedy decoding's."""

    name = "full"


@dataclass
class GenerationResult:
    text: str | None
    token_ids: list[int]  # the new tokens
    prompt_ids: torch.Tensor
    eviction: EvictionStats


def eos_ids(model) -> set[int]:
    """The token ids that end a greedy answer (the generation config's EOS, one or several)."""
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


def prompt_list(prompt) -> tuple[list, bool]:
    """(the prompts, whether `prompt` is a batch). A list or tuple of prompts is a batch, and so are
    token ids [B > 1, N] (one prompt per row); a list of chat messages (dicts) is one prompt."""
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() == 2 and prompt.shape[0] > 1:
            return list(prompt.split(1)), True
        return [prompt], False
    if isinstance(prompt, (list, tuple)):
        if not prompt:
            raise ValueError("prompt is an empty list: give a prompt, a list of chat messages or a list of prompts")
        if not isinstance(prompt[0], dict):
            return list(prompt), True
    return [prompt], False


@torch.no_grad()
def decode_greedy(model, evictions: list[Eviction], max_new_tokens: int) -> list[list[int]]:
    """Greedy tokens of each evicted prompt (up to max_new_tokens, EOS included), all rows decoded together.

    The first token comes from each prompt's full prefill, as in full-cache decoding; each row then
    decodes at its true positions N, N+1, ... on its compacted cache. A row that has ended keeps
    running with the batch, its tokens discarded.
    """
    eos = eos_ids(model)
    step_ids = torch.cat([e.next_logits.argmax(-1, keepdim=True) for e in evictions])  # [B, 1]
    tokens = [[token] for token in step_ids[:, 0].tolist()]
    ended = [row[0] in eos for row in tokens]
    if max_new_tokens == 1 or all(ended):
        return tokens
    if len(evictions) == 1:
        cache, masks = evictions[0].cache, ragged_masks(model)
    else:
        cache, pads = stack_caches([e.cache for e in evictions])
        masks = padded_masks(model, cache, pads) if any(bool(p.any()) for p in pads) else ragged_masks(model)
    positions = torch.tensor([[e.stats.num_prompt] for e in evictions], device=step_ids.device)
    with masks:
        for step in range(max_new_tokens - 1):
            out = model(input_ids=step_ids, position_ids=positions + step, past_key_values=cache, use_cache=True)
            step_ids = out.logits[:, -1].argmax(-1, keepdim=True)
            for row, token in enumerate(step_ids[:, 0].tolist()):
                if not ended[row]:
                    tokens[row].append(token)
                    ended[row] = token in eos
            if all(ended):
                break
    return tokens


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
) -> GenerationResult | list[GenerationResult]:
    """Greedy answer to `prompt` after evicting the prompt's KV cache with `policy` to `budget`.

    prompt: a string (chat-formatted when the tokenizer has a template, unless chat=False), a list
    of chat messages, or token ids [1, N]; or a batch: a list of such prompts (any lengths) or ids
    [B, N], answered with a list of results in the same order, each prompt evicted on its own and
    all decoded together (the module docstring). policy: a Policy or a name ("full": no eviction;
    options as keywords, e.g. policy="snapkv", window=64). budget: tokens (int), a ratio of each
    prompt (float), or one int per layer. Greedy is the argmax at every step (the model's generation
    config's sampling and penalties do not apply). With a budget >= the prompt length the tokens
    equal full-cache greedy decoding's.
    """
    check_int("max_new_tokens", max_new_tokens, 1)
    device = next(model.parameters()).device
    prompts, is_batch = prompt_list(prompt)
    all_ids = [encode_prompt(tokenizer, p, chat, device) for p in prompts]
    for ids in all_ids:
        if ids.shape[0] != 1:
            raise ValueError(f"a prompt of token ids in a list must have one row, got shape {tuple(ids.shape)}")
    if policy == _FullCache.name:
        if policy_options:
            raise ValueError(f'policy "full" takes no options, got {sorted(policy_options)}')
        policy, budget = _FullCache(), 1.0
    policy = make_policy(policy, model=model, **policy_options)
    evictions = [prefill_and_evict(model, ids, policy, budget, max_new_tokens=max_new_tokens) for ids in all_ids]
    answers = decode_greedy(model, evictions, max_new_tokens)
    results = [
        GenerationResult(
            tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else None,
            tokens,
            ids,
            eviction.stats,
        )
        for ids, tokens, eviction in zip(all_ids, answers, evictions)
    ]
    return results if is_batch else results[0]
