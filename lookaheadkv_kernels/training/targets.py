"""Training targets and the measures that compare a prediction with them.

The target of a prompt is, for every layer and KV head, the true importance of each prompt key: the
mean attention of the answer's tokens (teacher-forced after the prompt, with the full cache) to it,
reduced over the KV head's query heads by the mean (the GQA reduction of the LookaheadKV policy),
normalised to sum 1 over the prompt. It is computed with `attention_scores` from the answer's own
rotated queries, captured while the model runs the answer over the prompt's cache.
"""

from __future__ import annotations

import torch

from .. import attention_scores
from ..runtime.tap import tap_layers


def normalise(scores: torch.Tensor) -> torch.Tensor:
    """scores [..., N] (non-negative) rescaled to sum 1 over the last dim."""
    return scores / scores.sum(dim=-1, keepdim=True)


@torch.no_grad()
def answer_importance(model, prompt_cache, answer_ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the normalised importance [B, Hkv, N] of the N prompt keys held in `prompt_cache`.

    `prompt_cache` is the model's cache after the prompt (e.g. a DynamicCache); the answer
    `answer_ids` [B, A] is run over it (teacher forcing), which appends the answer's K/V to it.
    """
    num_prompt = prompt_cache.get_seq_length()
    importance: list[torch.Tensor] = []

    def record(inputs):
        queries = inputs.queries(slice(None))  # the answer rows, at positions N..N+A-1
        scores = attention_scores(
            queries, inputs.keys, num_scored=num_prompt, scale=inputs.parts.scaling, gqa_reduce="mean"
        )
        importance.append(normalise(scores))

    with tap_layers(model, record):
        model(input_ids=answer_ids, past_key_values=prompt_cache, use_cache=True, logits_to_keep=1)
    return importance


def kl_divergence(target: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """KL(target ‖ predicted) over the last dim, both distributions; shape of the leading dims.

    Terms with target 0 contribute 0; a predicted probability that underflowed to 0 is read as the
    smallest normal float so the loss stays finite.
    """
    tiny = torch.finfo(predicted.dtype).tiny
    return (torch.xlogy(target, target) - target * predicted.clamp_min(tiny).log()).sum(dim=-1)


def topk_recall(predicted: torch.Tensor, target: torch.Tensor, budget: int) -> torch.Tensor:
    """Share of the target's top-`budget` keys among the predicted top-`budget` keys, per leading index.

    Both [..., N]; budget < N. Ties are broken by position (torch.topk on the same values is not
    guaranteed stable, so ranks come from a stable sort).
    """

    def top(x):
        return torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :budget]

    return kept_recall(top(predicted), target, budget)


def kept_recall(kept: torch.Tensor, target: torch.Tensor, budget: int) -> torch.Tensor:
    """Share of the target's top-`budget` positions that are among the `kept` positions [..., M]."""
    oracle = torch.sort(target, dim=-1, descending=True, stable=True).indices[..., :budget]
    hits = (oracle[..., :, None] == kept[..., None, :]).any(dim=-1)
    return hits.float().mean(dim=-1)
