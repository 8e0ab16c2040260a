"""LookaheadKV (ICLR 2026): learned lookahead rows after the prompt score its keys."""

from __future__ import annotations

from ...ops.validation import check_finite, check_int
from ..lookahead import LookaheadModule, initial_hidden, lookahead_layer, lookahead_positions
from ..scoring import ScoreOptions, Scorer, SharesSum, WindowScorer
from .base import DEFAULT_NUM_SINK, Policy, Run, register

# The tuned defaults (docs/tuning.md).
LOOKAHEAD_POOL_KERNEL, LOOKAHEAD_POOL_TYPE = 17, "avg"
LOOKAHEAD_QUERY_REDUCE = "max"
LOOKAHEAD_DEPTH_RAMP = 0.5
LOOKAHEAD_WINDOW_VOTES, LOOKAHEAD_WINDOW = 1.0, 32
LOOKAHEAD_POOL_SHIFT = 4


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


class LookaheadRowsScorer(Scorer):
    """Runs the lookahead rows through each layer as the prefill passes it; their scores of the prompt keys."""

    def __init__(self, policy: LookaheadKV, run: Run):
        self.policy, self.run = policy, run
        self.hidden = None
        self.cos = self.sin = None

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
        return scores


@register
class LookaheadKV(Policy):
    """LookaheadKV: the trained lookahead rows' attention to the prompt keys is each key's importance.

    `module` is the `LookaheadModule` trained for the model (by name, `make_policy("lookaheadkv",
    model)` loads the one shipped for it). `gqa_reduce`, `pool_kernel`, `pool_type`, `query_reduce`
    turn the rows' attention into per-key scores (`ScoreOptions`); `pool_shift` moves every pooled
    score that many keys later (`shift_scores`); `recent` trailing prompt tokens are kept unscored;
    `depth_ramp` spreads the budget linearly over depth with the same total (`depth_ramp_budgets`);
    `window_votes` > 0 adds SnapKV's scores of the last `window` prompt queries, with the same
    options, as that weight times their share of the mass (`SharesSum`).

    The defaults are tuned beyond the paper (docs/tuning.md says how each was chosen);
    `LookaheadKV.paper(module)` is the paper's scoring: the mean over the rows, uniform budgets,
    centred pooling, no window votes. The paper states no pooling; `paper()` keeps avg-pool 17.
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

    @classmethod
    def paper(cls, module: LookaheadModule, **options) -> LookaheadKV:
        """The paper's configuration (with avg-pool 17, which the paper leaves open); `options` override it."""
        paper = dict(query_reduce="mean", depth_ramp=0.0, window_votes=0.0, pool_shift=0)
        return cls(module, **{**paper, **options})

    @classmethod
    def from_options(cls, model=None, **options) -> LookaheadKV:
        """Without a `module` option, the module shipped for `model` (loaded on every call: for
        repeated calls build `LookaheadKV(LookaheadModule.shipped(model))` once)."""
        if "module" not in options:
            if model is None:
                raise ValueError('policy "lookaheadkv" needs a module= option, or a model to find its shipped module')
            options["module"] = LookaheadModule.shipped(model)
        return cls(**options)

    def unscored_tail(self, num_prompt):
        return min(self.recent, num_prompt - 1)

    def layer_budgets(self, budget, num_prompt, num_layers):
        # Every layer keeps its sinks and its unscored recent tokens plus at least one scored key.
        return depth_ramp_budgets(budget, num_prompt, num_layers, self.depth_ramp, self.num_sink + self.recent + 1)

    def scorer(self, run):
        if self.module.config.architecture["num_hidden_layers"] != len(run.parts):
            raise ValueError("the lookahead module was built for a different number of layers")
        rows = LookaheadRowsScorer(self, run)
        if not self.window_votes:
            return rows
        # The window scores no appended rows: LookaheadKV appends none (run.num_extra is 0).
        return SharesSum(rows, WindowScorer(run, self.window, self.options), self.window_votes, self.num_sink)
