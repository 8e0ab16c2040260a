"""Which pooling / GQA reduction / per-layer budgets should LookaheadKV use? A measured sweep on SmolLM2.

The end-task scores of a 135M model at small budgets are mostly 0 or 100, too coarse to rank
scoring variants on a few prompts; this sweep measures something finer: the mean negative
log-likelihood per token of the full-cache greedy answer, teacher-forced on each evicted cache
(0 would be "the evicted cache predicts exactly what the full cache predicts"; Oracle, which scores
with that very answer, is the floor). Tuning split: evaluation-suite samples with index >= 1 — the
reported suite (`lookaheadkv eval`) uses index 0 only, so the choice is not made on the test
prompts. Resumable (one JSON line per prompt; a run measures only the (variant, budget) pairs a prompt's
line lacks, so new variants extend an existing file); ~40 min on one CPU core for the default grid
(1K/2K/4K; two processes on disjoint --lengths, writing files that are concatenated afterwards,
halve it):

    python bench/lookaheadkv_scoring_sweep.py --out bench/results/lookaheadkv_scoring_sweep.jsonl \
        > bench/results/lookaheadkv_scoring_sweep.md
"""

import argparse
import json
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from provenance import provenance

from lookaheadkv_kernels.argtypes import choice_list
from lookaheadkv_kernels.evaluation.policies import load_lookahead
from lookaheadkv_kernels.evaluation.replay import capture_prefill, decode, evict
from lookaheadkv_kernels.evaluation.tasks import DEFAULT_SEED, TASKS, make_sample, prompt_ids
from lookaheadkv_kernels.runtime import LookaheadKV, Oracle, SnapKV, load_model, ragged_masks

POOLINGS = {  # name: LookaheadKV scoring options (pool_kernel, pool_type, gqa_reduce, recent), uniform budgets, query mean
    "none": dict(pool_kernel=1),
    "max-pool 3": dict(pool_kernel=3, pool_type="max"),
    "max-pool 7": dict(pool_kernel=7, pool_type="max"),
    "max-pool 11": dict(pool_kernel=11, pool_type="max"),
    "avg-pool 3": dict(pool_kernel=3, pool_type="avg"),
    "avg-pool 5": dict(pool_kernel=5, pool_type="avg"),
    "avg-pool 9": dict(pool_kernel=9, pool_type="avg"),
    "avg-pool 13": dict(pool_kernel=13, pool_type="avg"),
    "avg-pool 17": dict(pool_kernel=17, pool_type="avg"),
    "avg-pool 25": dict(pool_kernel=25, pool_type="avg"),
    "avg-pool 31": dict(pool_kernel=31, pool_type="avg"),
    "GQA max": dict(pool_kernel=1, gqa_reduce="max"),
    "GQA max + max-pool 7": dict(pool_kernel=7, pool_type="max", gqa_reduce="max"),
    "avg-pool 5 + recent 16": dict(pool_kernel=5, pool_type="avg", recent=16),
    "avg-pool 5 + recent 32": dict(pool_kernel=5, pool_type="avg", recent=32),
}
VARIANTS = {name: dict(options, depth_ramp=0, query_reduce="mean") for name, options in POOLINGS.items()}
VARIANTS.update(
    {  # per-layer budgets linear in depth (LookaheadKV's depth_ramp), with the default pooling
        f"avg-pool 17 + depth ramp {ramp}": dict(pool_kernel=17, pool_type="avg", depth_ramp=ramp, query_reduce="mean")
        for ramp in (-0.5, 0.25, 0.5, 0.75)
    }
)
VARIANTS.update(
    {  # other widths with the default ramp (for the 8K sweep, where the default width was not tuned)
        f"avg-pool {kernel} + depth ramp 0.5": dict(
            pool_kernel=kernel, pool_type="avg", depth_ramp=0.5, query_reduce="mean"
        )
        for kernel in (9, 13, 25, 31)
    }
)
VARIANTS.update(
    {  # each key scored by the lookahead query that attends to it most, not by their mean
        "avg-pool 17 + depth ramp 0.5 + query max": dict(
            pool_kernel=17, pool_type="avg", depth_ramp=0.5, query_reduce="max"
        ),
        "avg-pool 13 + depth ramp 0.5 + query max": dict(
            pool_kernel=13, pool_type="avg", depth_ramp=0.5, query_reduce="max"
        ),
        "avg-pool 17 + depth ramp 0.75 + query max": dict(
            pool_kernel=17, pool_type="avg", depth_ramp=0.75, query_reduce="max"
        ),
        "avg-pool 17 + depth ramp 0.5 + query max + GQA max": dict(
            pool_kernel=17, pool_type="avg", depth_ramp=0.5, query_reduce="max", gqa_reduce="max"
        ),
    }
)
VARIANTS = {
    name: dict(options, window_votes=0) for name, options in VARIANTS.items()
}  # all above: the lookahead rows alone
VARIANTS.update(
    {  # the lookahead rows' scores plus SnapKV's window votes (LookaheadKV's window_votes)
        f"avg-pool 17 + depth ramp 0.5 + query max + window votes {weight}": dict(
            pool_kernel=17, pool_type="avg", depth_ramp=0.5, query_reduce="max", window_votes=weight, window=32
        )
        for weight in (0.5, 1.0)
    }
)
VARIANTS = {name: dict(options, pool_shift=0) for name, options in VARIANTS.items()}  # all above: unshifted
VARIANTS.update(
    {  # the pooled scores moved `shift` keys later (LookaheadKV's pool_shift)
        f"avg-pool {kernel} + depth ramp 0.5 + query max + window votes 1.0 + shift {shift}": dict(
            pool_kernel=kernel,
            pool_type="avg",
            depth_ramp=0.5,
            query_reduce="max",
            window_votes=1.0,
            window=32,
            pool_shift=shift,
        )
        for kernel, shift in ((17, 2), (17, 4), (17, 6), (13, 4))
    }
)
REFERENCES = {"SnapKV (paper config)": SnapKV, "Oracle": Oracle}


@torch.no_grad()
def answer_nll(model, cache, answer: torch.Tensor) -> float:
    """Mean NLL of answer[1:] given answer[:-1] on `cache` (answer[0] comes from the full prefill for every policy)."""
    with ragged_masks(model):
        logits = model(input_ids=answer[:, :-1], past_key_values=cache, use_cache=True).logits[0].float()
    return float(-torch.log_softmax(logits, -1).gather(-1, answer[0, 1:, None]).mean())


def load_records(path: Path) -> dict[str, dict]:
    lines = path.read_text().splitlines() if path.is_file() else []
    return {r["uid"]: r for r in map(json.loads, filter(str.strip, lines))}


def run(args) -> None:
    """Measure every (policy, budget) a prompt's record lacks; a new variant extends the existing records."""
    model, tokenizer = load_model("smollm2")
    module, _ = load_lookahead(model, args.module)
    policies = {name: LookaheadKV(module, **VARIANTS[name]) for name in args.variants}
    policies.update({name: cls() for name, cls in REFERENCES.items()})
    records = load_records(args.out)
    for length in args.lengths:
        for index in args.indices:
            for task in TASKS:
                sample = make_sample(task, length, index, tokenizer, DEFAULT_SEED)
                record = records.setdefault(sample.uid, {"uid": sample.uid, "length": length, "nll": {}})
                missing = [(name, b) for b in args.budgets for name in policies if f"{name}@{b}" not in record["nll"]]
                if not missing:
                    continue
                prefill = capture_prefill(model, torch.tensor([prompt_ids(sample, tokenizer)]))
                continuation = decode(model, prefill, prefill.full_cache(), max(sample.max_new_tokens, 32))
                answer = continuation[:, : max(2, min(sample.max_new_tokens, continuation.shape[1]))]
                for name, budget in missing:
                    replay = evict(
                        model,
                        prefill,
                        policies[name],
                        budget,
                        max_new_tokens=sample.max_new_tokens,
                        continuation=continuation,
                    )
                    record["nll"][f"{name}@{budget}"] = answer_nll(model, replay.cache, answer)
                tmp = args.out.with_suffix(".tmp")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in records.values()))
                tmp.replace(args.out)
                print(sample.uid, file=sys.stderr)


def report(args) -> str:
    records = list(load_records(args.out).values())
    names = list(VARIANTS) + list(REFERENCES)
    budgets = sorted({int(key.rsplit("@", 1)[1]) for r in records for key in r["nll"]})
    groups = defaultdict(list)
    for r in sorted(records, key=lambda r: r["length"]):
        groups[f"{r['length']} tokens"].append(r)
    groups["all lengths"] = records
    lines = [
        "# LookaheadKV scoring variants on SmolLM2 (`bench/lookaheadkv_scoring_sweep.py`)",
        "",
        provenance(str(args.out.with_suffix(".md"))),
        f"Mean NLL per token of the full-cache greedy answer, teacher-forced on the evicted cache (lower is "
        f"better); {len(records)} tuning prompts (evaluation-suite tasks, sample indices {sorted(set(args.indices))}, "
        f"disjoint from the reported suite's index 0); module `{args.module or 'shipped'}`.",
    ]
    for group, rows in groups.items():
        lines += [
            "",
            f"### {group} ({len(rows)} prompts)",
            "",
            "| LookaheadKV scoring | " + " | ".join(f"budget {b}" for b in budgets) + " |",
            "|---|" + "---|" * len(budgets),
        ]
        for name in names:
            if any(f"{name}@{b}" not in r["nll"] for r in rows for b in budgets):
                continue  # a variant not measured on every prompt of the group
            cells = [sum(r["nll"][f"{name}@{b}"] for r in rows) / len(rows) for b in budgets]
            lines.append(f"| {name} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSONL of per-prompt results (appended, resumable)")
    parser.add_argument("--module", default=None, help="lookahead module directory (default: the shipped one)")
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 2048, 4096])
    parser.add_argument("--indices", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    parser.add_argument("--budgets", type=lambda s: [int(x) for x in s.split(",")], default=[64, 128, 256])
    parser.add_argument(
        "--variants",
        type=choice_list(VARIANTS, "variants"),
        default=list(VARIANTS),
        help=f"comma-separated LookaheadKV variants to measure (default: all of {list(VARIANTS)})",
    )
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    if not args.report_only:
        run(args)
    print(report(args), end="")


if __name__ == "__main__":
    main()
