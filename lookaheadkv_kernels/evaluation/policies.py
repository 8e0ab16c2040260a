"""The policies the evaluation compares, by name: the runtime's policies, the full cache, kvpress peers.

"full" keeps the whole cache. "lookaheadkv" uses a trained lookahead module: the one shipped for the
model under `lookaheadkv_kernels/data/modules/`, or a directory given with `--module`. Names ending
in "-kvpress" are kvpress 0.5.x presses run on the same captured prefill (see `kvpress_peers`).
Two controls, not published methods: "snapkv-lkvpool" is SnapKV's window queries with LookaheadKV's
default pooling, and "snapkv-lkvconfig" adds LookaheadKV's per-layer budgets (its depth ramp), so
the suite separates what the lookahead rows add from what the pooling and the budget schedule add.
Three controls of the module itself: "lookaheadkv-rows" is the rows alone (LookaheadKV's defaults
without SnapKV's window votes), "lookaheadkv-paper" the paper's configuration
(`LookaheadKV.paper`), "lookaheadkv-untrained" the rows alone with the module's untrained
initialisation (seed 0, the trainer's default).
"""

from __future__ import annotations

from pathlib import Path

from ..argtypes import parse_names
from ..runtime.lookahead import LookaheadModule, shipped_module_dir
from ..runtime.policies import (
    LOOKAHEAD_DEPTH_RAMP,
    LOOKAHEAD_POOL_KERNEL,
    LOOKAHEAD_POOL_SHIFT,
    LOOKAHEAD_POOL_TYPE,
    LOOKAHEAD_QUERY_REDUCE,
    POLICIES,
    LookaheadKV,
    SnapKV,
    depth_ramp_budgets,
    make_policy,
)
from .kvpress_peers import PRESSES


class SnapKVWithLookaheadConfig(SnapKV):
    """SnapKV (window 32) with LookaheadKV's default pooling (and its shift), reduce over the queries
    and per-layer budgets: everything but the lookahead rows. Since LookaheadKV adds these very window votes to its
    rows' scores (`window_votes`), this is LookaheadKV without the rows — except that SnapKV keeps
    its window, which LookaheadKV does not."""

    name = "snapkv-lkvconfig"

    def __init__(self):
        super().__init__(
            pool_kernel=LOOKAHEAD_POOL_KERNEL,
            pool_type=LOOKAHEAD_POOL_TYPE,
            query_reduce=LOOKAHEAD_QUERY_REDUCE,
            pool_shift=LOOKAHEAD_POOL_SHIFT,
        )

    def layer_budgets(self, budget, num_prompt, num_layers):
        floor = self.num_sink + self.unscored_tail(num_prompt) + 1  # the sinks, the kept window, one scored key
        return depth_ramp_budgets(budget, num_prompt, num_layers, LOOKAHEAD_DEPTH_RAMP, floor)


def untrained_rows(module: LookaheadModule, model) -> LookaheadKV:
    config = module.config
    fresh = LookaheadModule(model, n_lookahead=config.n_lookahead, rank=config.rank, alpha=config.alpha, seed=0)
    return LookaheadKV(fresh.to(next(module.parameters()).device).eval(), window_votes=0)


FULL = "full"
MODULE_CONTROLS = {
    "lookaheadkv-rows": lambda module, model: LookaheadKV(module, window_votes=0),
    "lookaheadkv-paper": lambda module, model: LookaheadKV.paper(module),
    "lookaheadkv-untrained": untrained_rows,
}
# Every name that needs a lookahead module.
MODULE_POLICIES = ("lookaheadkv", *MODULE_CONTROLS, "lookaheadkv-kvpress")
CONTROLS = {
    "snapkv-lkvpool": lambda: SnapKV(pool_kernel=LOOKAHEAD_POOL_KERNEL, pool_type=LOOKAHEAD_POOL_TYPE),
    SnapKVWithLookaheadConfig.name: SnapKVWithLookaheadConfig,
}
PEER_POLICIES = tuple(PRESSES)
# Every name the evaluation runs: the full cache, the runtime's registered policies (in registration
# order), the controls, the kvpress peers.
ALL_POLICIES = (FULL, *POLICIES, *CONTROLS, *MODULE_CONTROLS, *PEER_POLICIES)


def load_lookahead(model, module_dir: str | Path | None = None) -> tuple[LookaheadModule, Path]:
    directory = Path(module_dir) if module_dir else shipped_module_dir(model)
    return LookaheadModule.load(directory, model).eval(), directory


def parse_policies(text: str) -> list[str]:
    return parse_names(text, ALL_POLICIES, "policies")


def build_policy(name: str, module: LookaheadModule | None, model=None):
    """A runtime Policy for `name` (not for "full" or kvpress peers); `model` for lookaheadkv-untrained."""
    if name in MODULE_POLICIES and module is None:
        raise ValueError(f"the {name} policy needs a lookahead module")
    if name == "lookaheadkv":
        return LookaheadKV(module)
    if name in MODULE_CONTROLS:
        return MODULE_CONTROLS[name](module, model)
    if name in CONTROLS:
        return CONTROLS[name]()
    return make_policy(name)


def parse_budgets(text: str) -> list[int | float]:
    """Budgets from "64,128,0.1": ints are token counts, decimals ratios of the prompt."""
    budgets = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        expected = f"budget {item!r}: expected an int >= 1 (tokens) or a ratio in (0, 1]"
        try:
            value = float(item) if any(c in item for c in ".eE") else int(item)
        except ValueError:
            raise ValueError(expected) from None
        if (isinstance(value, int) and value < 1) or (isinstance(value, float) and not 0 < value <= 1):
            raise ValueError(expected)
        budgets.append(value)
    if not budgets:
        raise ValueError("no budgets given")
    return budgets
