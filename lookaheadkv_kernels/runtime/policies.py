"""Eviction policies. Each one only decides *scores*; the engine (eviction.py) compacts every layer
with `select_compact`, and every attention-based score comes from `attention_scores` /
`lookahead_attention` over queries from `lookahead_qproj` — one scoring path, one compaction path.

A policy scores the prompt keys of one layer at a time, while the prefill passes through that layer
(see `LayerInputs`), so each layer is evicted before the next one fills its cache. Scores cover
prompt positions [0, S); positions [S, N) (an observation window) and the first `num_sink` are
always kept.

Defaults: `num_sink` = 4 leading tokens protected for every policy (StreamingLLM's attention sinks;
see docs/runtime.md for the measurement behind it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import attention_scores
from ..ops.validation import check_finite, check_int
from .cache import CompactedCache, compact_layer
from .lookahead import (
    LookaheadModule,
    ScoreOptions,
    initial_hidden,
    lookahead_layer,
    lookahead_positions,
    shift_scores,
)
from .models import LayerParts
from .tap import LayerInputs, tap_layers

DEFAULT_NUM_SINK = 4
# LookaheadKV's default smoothing of its scores before ranking, and its per-layer budget ramp (see
# LookaheadKV and depth_ramp_budgets).
LOOKAHEAD_POOL_KERNEL, LOOKAHEAD_POOL_TYPE = 17, "avg"
LOOKAHEAD_QUERY_REDUCE = "max"
LOOKAHEAD_DEPTH_RAMP = 0.5
LOOKAHEAD_WINDOW_VOTES, LOOKAHEAD_WINDOW = 1.0, 32
LOOKAHEAD_POOL_SHIFT = 4


@dataclass
class Run:
    """One eviction: the model, prompt length N, the rows appended after the prompt, per-layer budgets."""

    model: object
    parts: list[LayerParts]
    num_prompt: int
    num_extra: int
    budgets: list[int]
    max_new_tokens: int | None


def depth_ramp_budgets(budget: int, num_prompt: int, num_layers: int, ramp: float, floor: int) -> list[int]:
    """Per-layer budgets linear in depth, from (1 - ramp)·budget at the first layer to (1 + ramp)·budget
    at the last (ramp in (-1, 1): > 0 gives deep layers more, < 0 shallow ones, like PyramidKV),
    with the same total as `budget` in every layer.

    Integers by largest remainder, so the sum is exactly num_layers·budget; none below `floor` (what
    the policy always keeps, plus one scored key), which may take a few entries from the largest.
    ramp 0, a single layer, a prompt within `budget`, or a budget no larger than `floor` give
    `budget` everywhere.
    """
    if ramp == 0 or num_layers == 1 or budget >= num_prompt or budget <= floor:
        return [budget] * num_layers
    exact = [budget * (1 - ramp + 2 * ramp * i / (num_layers - 1)) for i in range(num_layers)]
    budgets = [max(floor, int(x)) for x in exact]
    unfloored = sorted((i for i in range(num_layers) if exact[i] >= floor), key=lambda i: int(exact[i]) - exact[i])
    for i in unfloored[: max(0, num_layers * budget - sum(budgets))]:  # largest remainders first
        budgets[i] += 1
    while sum(budgets) > num_layers * budget and max(budgets) > floor:
        budgets[budgets.index(max(budgets))] -= 1
    return budgets


def check_depth_ramp(depth_ramp) -> float:
    check_finite("depth_ramp", depth_ramp)
    if not -1 < depth_ramp < 1:
        raise ValueError(f"depth_ramp must be in (-1, 1), got {depth_ramp!r}")
    return float(depth_ramp)


def score_queries(queries: torch.Tensor, keys: torch.Tensor, num_scored: int, parts: LayerParts, options: ScoreOptions):
    """Scores [B, Hkv, num_scored] of the first keys for `queries`, which are the last rows of `keys`' positions."""
    scores = attention_scores(
        queries,
        keys,
        num_scored=num_scored,
        scale=parts.scaling,
        gqa_reduce=options.gqa_reduce,
        pool_kernel=options.pool_kernel,
        pool_type=options.pool_type,
        query_reduce=options.query_reduce,
    )
    return shift_scores(scores, options.pool_shift)


class Scorer:
    """Per-run scoring state of a policy."""

    def score(self, inputs: LayerInputs) -> torch.Tensor | None:
        """Scores [B, Hkv, S] of the prompt keys of `inputs.index`, or None to score it in `finish`."""
        raise NotImplementedError

    def finish(self, next_logits: torch.Tensor) -> dict[int, torch.Tensor]:
        """Scores of the layers deferred by `score`, once the whole prefill has run."""
        return {}


class Policy:
    """Base class: a name, the protected leading tokens, a per-layer budget rule, a scorer."""

    name = "policy"
    appends_rows = False  # True for policies whose extra_tokens prefill draft rows after the prompt

    def __init__(self, num_sink: int = DEFAULT_NUM_SINK):
        check_int("num_sink", num_sink, 0)
        self.num_sink = num_sink

    def layer_budgets(self, budget: int, num_prompt: int, num_layers: int) -> list[int]:
        """Per-layer budgets from one (already resolved) budget; uniform unless a policy says otherwise."""
        return [budget] * num_layers

    def unscored_tail(self, num_prompt: int) -> int:
        """Trailing prompt entries kept unscored (an observation window, recent tokens)."""
        return 0

    def always_kept(self, num_prompt: int) -> int:
        """Entries per layer kept whatever the scores: the sinks and the unscored tail. A layer budget
        below this (and below the prompt) cannot be honoured."""
        tail = self.unscored_tail(num_prompt)
        return min(self.num_sink, num_prompt - tail) + tail

    def extra_tokens(self, model, input_ids: torch.Tensor, max_new_tokens: int | None) -> torch.Tensor | None:
        """Token rows [B, E] to prefill after the prompt for scoring (dropped from the cache afterwards)."""
        return None

    def scorer(self, run: Run) -> Scorer:
        raise NotImplementedError

    def __repr__(self):
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


# ---- key-only policies ------------------------------------------------------------------------


class _KeyScorer(Scorer):
    def __init__(self, fn):
        self.fn = fn

    def score(self, inputs):
        return self.fn(inputs.keys)


class StreamingLLM(Policy):
    """Attention sinks plus the most recent tokens: scores rise with position, so the top are the newest."""

    name = "streamingllm"

    def scorer(self, run):
        n = run.num_prompt

        def recency(keys):
            order = torch.arange(n, device=keys.device, dtype=torch.float32)
            return order.expand(keys.shape[0], keys.shape[1], n)

        return _KeyScorer(recency)


class KNorm(Policy):
    """Keep the keys of smallest L2 norm (kvpress KnormPress: low-norm keys draw the most attention)."""

    name = "knorm"

    def scorer(self, run):
        n = run.num_prompt
        return _KeyScorer(lambda keys: -keys[:, :, :n].float().norm(dim=-1))


class RandomPolicy(Policy):
    """Uniformly random scores (seeded): the floor every other policy must beat."""

    name = "random"

    def __init__(self, seed: int = 0, num_sink: int = DEFAULT_NUM_SINK):
        super().__init__(num_sink)
        self.seed = seed

    def scorer(self, run):
        generator = torch.Generator().manual_seed(self.seed)
        n = run.num_prompt

        def uniform(keys):
            return torch.rand(keys.shape[0], keys.shape[1], n, generator=generator).to(keys.device)

        return _KeyScorer(uniform)


# ---- query-window policies: SnapKV, PyramidKV, SpecKV, Oracle ------------------------------------


class _WindowScorer(Scorer):
    """Queries of the last `window` prompt rows plus every appended row; scores of the keys before the window."""

    def __init__(self, run: Run, window: int, options: ScoreOptions):
        self.run, self.options = run, options
        self.window = min(window, run.num_prompt - 1)  # at least one scored key

    def score(self, inputs):
        n = self.run.num_prompt
        q = inputs.queries(slice(n - self.window, n + self.run.num_extra))
        return score_queries(q, inputs.keys, n - self.window, inputs.parts, self.options)


class SnapKV(Policy):
    """SnapKV: the last `window` prompt queries vote; window kept. Defaults: the paper's window 32 + max-pool 7.

    `SnapKV.kvpress()` gives kvpress's defaults (window 64, avg-pool 5). GQA: scores averaged over
    each KV head's query heads, as in kvpress (one cache per KV head). The window's votes are
    averaged (`query_reduce="mean"`, the paper's sum up to a constant); "max" is LookaheadKV's rule,
    as is `pool_shift` (0 here: each key keeps its own pooled score; see `shift_scores`).
    """

    name = "snapkv"

    def __init__(
        self,
        window: int = 32,
        pool_kernel: int = 7,
        pool_type: str = "max",
        gqa_reduce: str = "mean",
        num_sink: int = DEFAULT_NUM_SINK,
        query_reduce: str = "mean",
        pool_shift: int = 0,
    ):
        super().__init__(num_sink)
        check_int("window", window, 0)
        check_int("pool_shift", pool_shift, 0)
        self.window = window
        self.options = ScoreOptions(gqa_reduce, pool_kernel, pool_type, query_reduce, pool_shift)

    def unscored_tail(self, num_prompt):
        return min(self.window, num_prompt - 1)  # as _WindowScorer: at least one scored key

    @classmethod
    def kvpress(cls, num_sink: int = DEFAULT_NUM_SINK) -> SnapKV:
        return cls(window=64, pool_kernel=5, pool_type="avg", num_sink=num_sink)

    def scorer(self, run):
        return _WindowScorer(run, self.window, self.options)


class PyramidKV(SnapKV):
    """SnapKV scores with budgets falling linearly over depth (PyramidKV, beta 20), averaging `budget`."""

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


class SpecKV(SnapKV):
    """SpecKV: a draft model writes `num_draft` tokens; the target scores the prompt with the draft's
    queries plus the last `window` prompt queries (max over GQA group, max-pool 7).

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


class Oracle(SnapKV):
    """Upper bound: the queries of the model's own full-cache greedy answer score all prompt keys.

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


def greedy_continuation(model, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """The greedy full-cache continuation [B, <=max_new_tokens] of `input_ids` (stops at EOS)."""
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
    )
    return out[:, input_ids.shape[1] :]


# ---- LookaheadKV ---------------------------------------------------------------------------------


class _LookaheadScorer(Scorer):
    def __init__(self, policy: LookaheadKV, run: Run):
        self.policy, self.run = policy, run
        self.hidden = None
        self.cos = self.sin = None
        # SnapKV's scoring of the window votes (LookaheadKV appends no rows: the window's queries only).
        self.votes = _WindowScorer(run, policy.window, policy.options) if policy.window_votes else None

    def score(self, inputs):
        policy, module, n = self.policy, self.policy.module, self.run.num_prompt
        if self.hidden is None:
            self.hidden = initial_hidden(module, inputs.keys.shape[0], inputs.hidden)
            self.cos, self.sin = lookahead_positions(self.run.model, n, module.config.n_lookahead, self.hidden)
        self.hidden, scores = lookahead_layer(
            module,
            inputs.parts,
            inputs.index,
            self.hidden,
            self.cos,
            self.sin,
            inputs.keys[:, :, :n],
            inputs.values[:, :, :n],
            n - policy.unscored_tail(n),
            policy.options,
        )
        if self.votes is None:
            return scores
        return add_votes(scores, self.votes.score(inputs), policy.window_votes, policy.num_sink)


def add_votes(scores: torch.Tensor, votes: torch.Tensor, weight: float, num_sink: int) -> torch.Tensor:
    """scores + weight·votes, each first divided by its sum over the keys after the sinks (its share of
    the attention mass the ranking decides on), over the keys both score; [B, Hkv, len(scores)]."""

    def shares(x):
        return x / x[..., num_sink:].sum(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)

    both = min(scores.shape[-1], votes.shape[-1])
    mixed = shares(scores)
    mixed[..., :both] += weight * shares(votes)[..., :both]
    return mixed


class LookaheadKV(Policy):
    """LookaheadKV: the learned lookahead rows' attention to the prompt keys is the importance.

    `recent` prompt tokens at the end are always kept (0 by default: the lookahead rows score every
    key). GQA mean and avg-pool 17 by default: on held-apart prompts of the evaluation tasks this
    kept the full-cache answer likeliest at budgets 64-128 among avg-pools of 3-31, max-pools, GQA max
    and keeping the question (bench/results/lookaheadkv_scoring_sweep.md). Wide windows keep whole
    spans, e.g. all the digits of a number a needle task asks for, where narrow ones keep some.

    `query_reduce="max"` (default since session 6): a key scores the largest attention any one
    lookahead query gives it, not their mean — the 32 queries can point at different spans (the
    several needles a question asks for), and a mean lets the span most of them share crowd out the
    rest. On the same held-apart prompts it kept the full-cache answer likelier at budgets 64, 128
    and 256; the module is still trained on the mean (a module trained on the max measured worse
    there: bench/results/lookaheadkv_training_variants.md).

    `depth_ramp` spreads the budget over depth (`depth_ramp_budgets`): 0.5 by default, i.e. from
    0.5·budget at the first layer to 1.5·budget at the last, the same KV memory in total. Not in the
    paper (uniform budgets: depth_ramp=0); chosen on the same held-apart prompts, where deep layers
    given more of the budget kept the answer likelier than uniform ones (and than PyramidKV's shape,
    shallow layers first).

    `window_votes` (default 1.0 since session 7) adds SnapKV's evidence: the last `window` prompt
    queries (the question) score the keys before them with the same options, and a key ranks by its
    share of the lookahead rows' attention mass plus `window_votes` times its share of the window's
    (shares over the keys after the sinks: `add_votes`). Not in the paper (0 gives the paper's
    scores). On the same held-apart prompts it kept the full-cache answer likelier than the lookahead
    rows alone at budgets 128 and 256 over 1K-4K (worse at 64) and at every budget at 8K, and lifted
    the suite at 128 (bench/results/README_results.md); it costs one `attention_scores` call of
    `window` queries per layer on top (SnapKV's own scoring: +40-60% eviction work on SmolLM2's CPU
    runs). The window is not kept as such.

    `pool_shift` (default 4 since session 8) moves every pooled score 4 keys later (`shift_scores`):
    the avg-pool window of key j becomes [j - 12, j + 4], so a kept span reaches 4 tokens further
    past the keys the queries attend to — the end of a number, the words after a name: what the
    model reads next when it copies a span (with a centred window its answers ran numbers on,
    e.g. `21236299` for `2123629`). Not in the paper (0 gives centred pooling). On the same
    held-apart prompts it kept the full-cache answer likelier at every budget (over 1K-4K -14% NLL
    at 64, -2% at 128, -3% at 256; at 8K -5% at 64 and 128; shifts of 2 and 6 about as good),
    windows moved the other way far worse (bench/results/lookaheadkv_scoring_sweep.md); on the
    suite it lifted LookaheadKV at 128 from 28.2 to 42.4 (bench/results/README_results.md).
    """

    name = "lookaheadkv"

    def __init__(
        self,
        module: LookaheadModule,
        gqa_reduce: str = "mean",
        pool_kernel: int = LOOKAHEAD_POOL_KERNEL,
        pool_type: str = LOOKAHEAD_POOL_TYPE,
        recent: int = 0,
        depth_ramp: float = LOOKAHEAD_DEPTH_RAMP,
        num_sink: int = DEFAULT_NUM_SINK,
        query_reduce: str = LOOKAHEAD_QUERY_REDUCE,
        window_votes: float = LOOKAHEAD_WINDOW_VOTES,
        window: int = LOOKAHEAD_WINDOW,
        pool_shift: int = LOOKAHEAD_POOL_SHIFT,
    ):
        super().__init__(num_sink)
        if not isinstance(module, LookaheadModule):
            raise TypeError(f"LookaheadKV needs a LookaheadModule, got {type(module).__name__}")
        self.module = module
        check_int("recent", recent, 0)
        check_int("window", window, 1)
        check_int("pool_shift", pool_shift, 0)
        check_finite("window_votes", window_votes)
        if window_votes < 0:
            raise ValueError(f"window_votes must be >= 0, got {window_votes!r}")
        self.options = ScoreOptions(gqa_reduce, pool_kernel, pool_type, query_reduce, pool_shift)
        self.recent = recent
        self.depth_ramp = check_depth_ramp(depth_ramp)
        self.window_votes, self.window = float(window_votes), window

    def unscored_tail(self, num_prompt):
        return min(self.recent, num_prompt - 1)

    def layer_budgets(self, budget, num_prompt, num_layers):
        # Every layer keeps its sinks and its unscored recent tokens plus at least one scored key.
        return depth_ramp_budgets(budget, num_prompt, num_layers, self.depth_ramp, self.num_sink + self.recent + 1)

    def scorer(self, run):
        if self.module.config.architecture["num_hidden_layers"] != len(run.parts):
            raise ValueError("the lookahead module was built for a different number of layers")
        return _LookaheadScorer(self, run)


# ---- LAQ -----------------------------------------------------------------------------------------


class _LAQScorer(Scorer):
    def __init__(self, policy: LAQ, run: Run):
        self.policy, self.run = policy, run
        self.snap = _WindowScorer(run, policy.snap_window, policy.snap_options)
        self.window = min(policy.window, run.num_prompt - 1)
        self.copy = CompactedCache()
        self.prompt_queries: dict[int, torch.Tensor] = {}  # last `window` prompt rows, per layer
        self.pseudo_queries: dict[int, list[torch.Tensor]] = {}  # one [B, Hq, 1, D] per drafted token
        self.full_keys: dict[int, torch.Tensor] = {}

    def score(self, inputs):
        n, idx = self.run.num_prompt, inputs.index
        self.prompt_queries[idx] = inputs.queries(slice(n - self.window, n))
        self.full_keys[idx] = inputs.keys
        # The SnapKV-compressed copy the pseudo tokens are drafted on.
        while len(self.copy.layers) <= idx:
            self.copy.layers.append(self.copy.layer_class_to_replicate())
        compact_layer(
            self.copy.layers[idx],
            self.snap.score(inputs),
            inputs.keys,
            inputs.values,
            self.run.budgets[idx],
            self.policy.num_sink,
            n,
        )
        return None  # the full layer stays until the pseudo queries exist

    def finish(self, next_logits):
        model, n = self.run.model, self.run.num_prompt
        token = next_logits.argmax(-1, keepdim=True)

        def record(inputs):
            self.pseudo_queries.setdefault(inputs.index, []).append(inputs.queries(slice(0, 1)))

        with tap_layers(model, record):
            for _ in range(self.policy.num_pseudo):
                logits = model(input_ids=token, past_key_values=self.copy, use_cache=True).logits
                token = logits[:, -1].argmax(-1, keepdim=True)

        scores = {}
        for idx, parts in enumerate(self.run.parts):
            keys = self.full_keys.pop(idx)
            pseudo = self.copy.layers[idx]
            queries = torch.cat([self.prompt_queries[idx], *self.pseudo_queries[idx]], dim=2)
            all_keys = torch.cat([keys[:, :, :n], pseudo.keys[:, :, -self.policy.num_pseudo :]], dim=2)
            scores[idx] = score_queries(queries, all_keys, n - self.window, parts, self.policy.options)
        return scores


class LAQ(Policy):
    """Lookahead Q-Cache: draft `num_pseudo` greedy tokens on a SnapKV-compressed copy (window
    `snap_window`, max-pool 7), then score the full prompt with their queries plus the last `window`
    prompt queries (max over GQA group, max-pool 7); the window is kept. Needs the full cache alive
    until the draft is done, by construction."""

    name = "laq"

    def __init__(
        self,
        num_pseudo: int = 8,
        window: int = 8,
        snap_window: int = 32,
        pool_kernel: int = 7,
        gqa_reduce: str = "max",
        num_sink: int = DEFAULT_NUM_SINK,
    ):
        super().__init__(num_sink)
        check_int("num_pseudo", num_pseudo, 1)
        check_int("window", window, 0)
        check_int("snap_window", snap_window, 0)
        self.num_pseudo, self.window, self.snap_window = num_pseudo, window, snap_window
        self.options = ScoreOptions(gqa_reduce, pool_kernel, "max")
        self.snap_options = ScoreOptions("mean", pool_kernel, "max")

    def unscored_tail(self, num_prompt):
        # Its window is kept, and the SnapKV-compressed copy it drafts on keeps snap_window, same budget.
        return min(max(self.window, self.snap_window), num_prompt - 1)

    def scorer(self, run):
        return _LAQScorer(self, run)


POLICIES = {
    cls.name: cls for cls in (SnapKV, PyramidKV, StreamingLLM, KNorm, RandomPolicy, LAQ, SpecKV, Oracle, LookaheadKV)
}


def make_policy(policy, model=None, **kwargs) -> Policy:
    """A Policy instance from an instance or a name ("snapkv", "snapkv-kvpress", "pyramidkv", ...).

    "lookaheadkv" without a `module` option loads the module shipped for `model` — on every call
    (~40 ms for SmolLM2); for repeated calls build `LookaheadKV(LookaheadModule.shipped(model))` once.
    """
    if isinstance(policy, Policy):
        if kwargs:
            raise ValueError(f"policy options {sorted(kwargs)} given with a ready policy instance")
        return policy
    if policy == "lookaheadkv" and "module" not in kwargs:
        if model is None:
            raise ValueError('policy "lookaheadkv" needs a module= option, or a model to find its shipped module')
        kwargs["module"] = LookaheadModule.shipped(model)
    if policy == "snapkv-kvpress":
        return SnapKV.kvpress(**kwargs)
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {sorted(POLICIES) + ['snapkv-kvpress']}")
    return POLICIES[policy](**kwargs)
