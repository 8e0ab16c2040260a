"""Held-out report of a lookahead module: recall of the oracle's top-budget keys, policy by policy.

For every held-out prompt (1K–4K tokens, the "heldout" split of training/data.py, never the
evaluation suite's tasks) the oracle is the teacher's true importance (targets.py). Each policy
keeps, per layer and KV head, the positions the runtime's own scorer and compaction path
(`Policy.scorer`, `compact_layer` → `select_compact`) would keep at that budget; recall@B is the
share of the oracle's top-B positions among them, averaged over KV heads, layers and prompts.

One prefill per prompt serves every policy and budget: the layer inputs the runtime's tap hands to
a scorer during an evicting prefill (hidden states, positions, the layer's full prompt K/V) are
recorded once, then replayed to each policy's scorer. The replay equals the interleaved eviction
because a layer's eviction changes only its cache, never the prefill's hidden states.

    python -m lookaheadkv_kernels.training.report --module DIR --out bench/results/training_smollm2.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file

from ..argtypes import positive_int, torch_device
from ..provenance import provenance
from ..runtime.cache import CompactedCache, CompactedLayer, compact_layer
from ..runtime.lookahead import LookaheadModule
from ..runtime.models import cache_dir, config_hash, layer_parts, load_model
from ..runtime.policies import (
    DEFAULT_NUM_SINK,
    LAQ,
    LOOKAHEAD_DEPTH_RAMP,
    LOOKAHEAD_POOL_KERNEL,
    LOOKAHEAD_POOL_SHIFT,
    LOOKAHEAD_POOL_TYPE,
    LOOKAHEAD_QUERY_REDUCE,
    LookaheadKV,
    PyramidKV,
    Run,
    SnapKV,
    StreamingLLM,
)
from ..runtime.tap import LayerInputs, tap_layers
from .data import make_samples
from .targets import kept_recall, kl_divergence
from .teacher import build_records, load_record
from .trainer import TrainConfig, distributions

LENGTHS = (1024, 2048, 3072, 4096)
BUDGETS = (64, 128, 256, 512)


@torch.no_grad()
def record_prefill(model, input_ids):
    """(per-layer LayerInputs of a full prefill, next-token logits), as the runtime's tap sees them."""
    layers = []
    cache = CompactedCache()
    with tap_layers(model, layers.append):
        logits = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    return layers, logits


@torch.no_grad()
def policy_scores(model, layers, next_logits, policy, budgets: list[int], num_prompt: int) -> list[torch.Tensor]:
    """Per layer, `policy`'s scores of the prompt keys with per-layer `budgets` (replaying the recorded prefill)."""
    parts = layer_parts(model)
    scorer = policy.scorer(Run(model, parts, num_prompt, 0, budgets, None))
    scores = {inputs.index: s for inputs in layers if (s := scorer.score(inputs)) is not None}
    scores.update(scorer.finish(next_logits))
    return [scores[i] for i in range(len(layers))]


def compact_all(layers, scores, budgets: list[int], num_sink: int, num_prompt: int) -> list[torch.Tensor]:
    """Per layer, the kept positions [B, Hkv, M] of the runtime's compaction path (the cache is not touched)."""
    return [
        compact_layer(CompactedLayer(), s, inputs.keys, inputs.values, b, num_sink, num_prompt)
        for inputs, s, b in zip(layers, scores, budgets)
    ]


def kept_positions(model, layers, next_logits, policy, budget: int, num_prompt: int) -> list[torch.Tensor]:
    """Per layer, the kept positions [B, Hkv, M] of `policy` at `budget`, as an evicting prefill keeps them."""
    budgets = policy.layer_budgets(budget, num_prompt, len(layers))
    scores = policy_scores(model, layers, next_logits, policy, budgets, num_prompt)
    return compact_all(layers, scores, budgets, policy.num_sink, num_prompt)


def kv_only_inputs(model, keys: torch.Tensor, values: torch.Tensor) -> list[LayerInputs]:
    """Layer inputs that carry only the prompt K/V [L, B, Hkv, N, D] (no hidden rows, no positions).

    Enough for the LookaheadKV scorer, which reads the prompt's keys and values and takes only the
    dtype and device of the hidden rows; lets a module be scored on a saved prefill.
    """
    parts = layer_parts(model)
    empty = keys.new_empty(keys.shape[1], 0, model.config.hidden_size)
    return [
        LayerInputs(i, parts[i], empty, None, None, SimpleNamespace(keys=keys[i], values=values[i]))
        for i in range(len(parts))
    ]


def mean_recall(kept: list[torch.Tensor], oracle: torch.Tensor, budget: int) -> float:
    return float(torch.stack([kept_recall(k[0], o, budget).mean() for k, o in zip(kept, oracle)]).mean())


@torch.no_grad()
def baseline_row(model, record, policies: dict, budgets, kv_path: Path) -> dict:
    """Recall of the module-free policies on one prompt; saves the prompt's K/V for the module part."""
    device = next(model.parameters()).device
    n = record.num_prompt
    layers, next_logits = record_prefill(model, record.prompt_ids[None].to(device))
    oracle = record.importance.to(device)
    recall = {
        name: {b: mean_recall(kept_positions(model, layers, next_logits, policy, b, n), oracle, b) for b in budgets}
        for name, policy in policies.items()
    }
    kv_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            "keys": torch.stack([x.keys for x in layers]).cpu().contiguous(),
            "values": torch.stack([x.values for x in layers]).cpu().contiguous(),
        },
        kv_path,
    )
    return {"key": record.key, "task": record.task, "prompt_tokens": n, "recall": recall, "kl": {}}


@torch.no_grad()
def module_part(model, record, modules: dict, budgets, kv_path: Path, row: dict) -> None:
    """Add each module's LookaheadKV recall and KL to `row`, scored on the saved prompt K/V."""
    device = next(model.parameters()).device
    n = record.num_prompt
    saved = load_file(kv_path, device=str(device))
    layers = kv_only_inputs(model, saved["keys"], saved["values"])
    oracle = record.importance.to(device)
    for name, module in modules.items():
        # Recall: the policy as users get it (its default pooling, shift and max over the queries), less
        # the window votes (the report measures the module; this scores saved K/V without hidden rows);
        # and "-as-trained": the scoring the loss fits (mean over the queries, avg-pool 5, no shift) with
        # uniform budgets.
        # KL: the loss training fits by default (trainer.distributions with TrainConfig(), which pools),
        # from the unpooled, unshifted mean over the queries.
        # Scores do not depend on the budget: score once, compact per budget.
        variants = {
            name: LookaheadKV(module, window_votes=0),  # the module alone (the window's votes are SnapKV's)
            f"{name}-as-trained": LookaheadKV(
                module, window_votes=0, query_reduce="mean", pool_kernel=5, pool_type="avg", pool_shift=0, depth_ramp=0
            ),
        }
        for label, policy in variants.items():
            scores = policy_scores(model, layers, None, policy, [n] * len(layers), n)
            row["recall"][label] = {
                b: mean_recall(
                    compact_all(layers, scores, policy.layer_budgets(b, n, len(layers)), policy.num_sink, n), oracle, b
                )
                for b in budgets
            }
        unpooled_policy = LookaheadKV(module, pool_kernel=1, query_reduce="mean", window_votes=0, pool_shift=0)
        unpooled = policy_scores(model, layers, None, unpooled_policy, [n] * len(layers), n)
        target, predicted = distributions(oracle, torch.stack([s[0] for s in unpooled]), TrainConfig())
        row["kl"][name] = float(kl_divergence(target, predicted).mean())


def evaluate(model, record_paths, policies: dict, modules: dict, budgets, work_dir: Path, progress=True):
    """Per-prompt rows ({"recall": {policy: {budget: recall}}, "kl": {module: kl}, ...}).

    The module-free part of every prompt (one prefill) is cached under work_dir with the prompt's
    K/V, so it runs once, can run before training ends, and resumes; modules are scored on top.
    """
    rows = []
    for path in record_paths:
        record = load_record(path)
        row_path, kv_path = work_dir / f"{record.key}.json", work_dir / f"{record.key}.kv.safetensors"
        started = time.perf_counter()
        if row_path.is_file() and kv_path.is_file():
            row = json.loads(row_path.read_text(), object_hook=_int_budgets)
        else:
            row = baseline_row(model, record, policies, budgets, kv_path)
            row_path.write_text(json.dumps(row))
        if modules:
            module_part(model, record, modules, budgets, kv_path, row)
        row["seconds"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        if progress:
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def _int_budgets(mapping: dict) -> dict:
    return {int(k) if k.isdigit() else k: v for k, v in mapping.items()}


def summarise(rows, budgets):
    names = list(rows[0]["recall"])
    recall = {name: {b: sum(r["recall"][name][b] for r in rows) / len(rows) for b in budgets} for name in names}
    kl = {name: sum(r["kl"][name] for r in rows) / len(rows) for name in rows[0]["kl"]}
    return recall, kl


def pooling(config: TrainConfig) -> str:
    return "unpooled" if config.pool_kernel == 1 else f"{config.pool_type}-pooled over {config.pool_kernel} keys"


def markdown(recall, kl, rows, budgets, settings: dict) -> str:
    config = TrainConfig()
    lines = [
        "# LookaheadKV training report: SmolLM2-135M-Instruct, held-out split",
        "",
        f"Held-out prompts: {len(rows)} ({', '.join(f'{k}: {v}' for k, v in _count(rows, 'task').items())}), "
        f"{min(r['prompt_tokens'] for r in rows)}–{max(r['prompt_tokens'] for r in rows)} tokens "
        f"(targets {', '.join(str(x) for x in settings['lengths'])}). Oracle: the teacher's true importance "
        f"(mean attention of its greedy answer, ≤{settings['answer_tokens']} tokens). Recall@B = share of the "
        "oracle's top-B keys among the keys the policy keeps at budget B (its sinks and windows included), "
        f"mean over KV heads, layers and prompts. All policies protect {DEFAULT_NUM_SINK} sink tokens and use their "
        f"defaults (LookaheadKV: {LOOKAHEAD_POOL_TYPE}-pool {LOOKAHEAD_POOL_KERNEL}, {LOOKAHEAD_QUERY_REDUCE} over its queries, "
        f"scores moved {LOOKAHEAD_POOL_SHIFT} keys later, depth ramp {LOOKAHEAD_DEPTH_RAMP}; the module alone, without the "
        "policy's window votes, which are SnapKV's). Rows ending in -as-trained score the same modules the way "
        "the loss fits them (the mean over the queries, avg-pool 5, no shift) with uniform budgets.",
        "",
        "| policy | " + " | ".join(f"recall@{b}" for b in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    for name, values in recall.items():
        lines.append(f"| {name} | " + " | ".join(f"{values[b]:.3f}" for b in budgets) + " |")
    lines += [
        "",
        f"KL(true importance ‖ module's scores) over the keys after the {config.num_sink} sinks, both "
        f"{pooling(config)} and renormalised (the loss training fits by default), mean over layers, heads and prompts:",
        "",
    ]
    lines += [f"- {name}: {value:.4f}" for name, value in kl.items()]
    shown = [p for p in ("lookaheadkv", "snapkv", "laq") if p in recall]
    lines += [
        "",
        f"Recall@B by prompt length ({', '.join(shown)}):",
        "",
        "| length | prompts | " + " | ".join(f"{p} @{b}" for p in shown for b in budgets) + " |",
        "|---|---|" + "---|" * (len(shown) * len(budgets)),
    ]
    for length in settings["lengths"]:
        group = [r for r in rows if r["length_target"] == length]
        if not group:
            continue
        cells = [f"{sum(r['recall'][p][b] for r in group) / len(group):.3f}" for p in shown for b in budgets]
        lines.append(f"| ~{length} | {len(group)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Command and settings:",
        "",
        "```",
        settings["command"],
        json.dumps(settings, indent=1, default=str),
        "```",
        "",
    ]
    return "\n".join(lines)


def curves(history: dict, prompts_per_step: float) -> str:
    """Markdown table of a training run's history.json: each validation with the mean training loss
    of the steps since the previous one."""
    losses, lines = history["losses"], []
    keys = [k for k in history["validations"][0] if k.startswith("recall@")] if history["validations"] else []
    lines += [
        "| step | prompts seen | training loss (mean since last row) | held-out KL | "
        + " | ".join(f"held-out {k}" for k in keys)
        + " |",
        "|---|---|---|---|" + "---|" * len(keys),
    ]
    previous = 0
    for v in history["validations"]:
        step = v["step"]
        span = losses[previous:step]
        loss = f"{sum(span) / len(span):.4f}" if span else "–"
        cells = " | ".join(f"{v[k]:.3f}" for k in keys)
        lines.append(f"| {step} | {round(step * prompts_per_step)} | {loss} | {v['kl']:.4f} | {cells} |")
        previous = step
    return "\n".join(lines)


def _count(rows, field):
    counts = {}
    for r in rows:
        counts[r[field]] = counts.get(r[field], 0) + 1
    return counts


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(
        prog="python -m lookaheadkv_kernels.training.report", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--module",
        help="trained lookahead module directory; without it only the module-free "
        "policies run (their rows are cached for the run with a module)",
    )
    p.add_argument(
        "--compare-module",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="another module to score beside --module, reported as NAME (repeatable)",
    )
    p.add_argument(
        "--history",
        help="the training run's history.json (with its run.json beside it): adds the training curves",
    )
    p.add_argument("--model", default="smollm2")
    p.add_argument(
        "--out", required=True, help="markdown report path (a .json with every prompt's row is written next to it)"
    )
    p.add_argument("--per-length", type=positive_int, default=4, help="held-out prompts per target length")
    p.add_argument("--lengths", type=positive_int, nargs="+", default=list(LENGTHS))
    p.add_argument("--budgets", type=positive_int, nargs="+", default=list(BUDGETS))
    p.add_argument("--answer-tokens", type=positive_int, default=48)
    p.add_argument("--teacher-batch", type=positive_int, default=4)
    p.add_argument("--seed", type=int, default=0, help="data seed of the held-out prompts")
    p.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--records-only", action="store_true", help="only build the held-out teacher records (resumable)")
    args = p.parse_args(argv)

    model, tokenizer = load_model(args.model, device=args.device)

    def count_tokens(text):
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    directory = cache_dir() / "training" / config_hash(model.config) / f"report-seed{args.seed}-ans{args.answer_tokens}"
    paths, length_of = [], {}
    for i, length in enumerate(args.lengths):
        # Indices from 10_000 up: disjoint from the short validation prompts of the same split.
        samples = make_samples(
            "heldout",
            args.per_length,
            count_tokens,
            min_tokens=length * 7 // 8,
            max_tokens=length,
            seed=args.seed,
            start=10_000 + 1_000 * i,
        )
        found = build_records(
            model,
            tokenizer,
            samples,
            directory,
            max_new_tokens=args.answer_tokens,
            store_kv=False,
            batch_size=args.teacher_batch,
        )
        paths += found
        length_of.update({load_record(f).key: length for f in found})

    if args.records_only:
        return 0
    policies = {"snapkv": SnapKV(), "pyramidkv": PyramidKV(), "streamingllm": StreamingLLM(), "laq": LAQ()}
    modules = {}
    if args.module:
        trained = LookaheadModule.load(args.module, model).to(args.device).eval()
        untrained = (
            LookaheadModule(
                model,
                n_lookahead=trained.config.n_lookahead,
                rank=trained.config.rank,
                alpha=trained.config.alpha,
                seed=0,
            )
            .to(args.device)
            .eval()
        )
        modules = {"lookaheadkv": trained, "lookaheadkv-untrained": untrained}
        for spec in args.compare_module:
            name, sep, module_dir = spec.partition("=")
            if not sep or not name or not module_dir or name in modules or name in policies:
                p.error(f"--compare-module {spec!r}: expected a new NAME=DIR")
            modules[name] = LookaheadModule.load(module_dir, model).to(args.device).eval()
    work_dir = directory / "baselines"
    rows = evaluate(model, paths, policies, modules, args.budgets, work_dir)
    if not modules:
        return 0
    for row in rows:
        row["length_target"] = length_of[row["key"]]
    recall, kl = summarise(rows, args.budgets)
    settings = {
        "command": "python -m lookaheadkv_kernels.training.report " + " ".join(argv),
        **vars(args),
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(recall, kl, rows, args.budgets, settings)
    title, rest = text.split("\n", 1)
    text = f"{title}\n\n{provenance(str(out), settings['command'])}{rest}"
    if args.history:
        history = json.loads(Path(args.history).read_text())
        run = json.loads(Path(args.history).with_name("run.json").read_text())
        config = run["train_config"]
        text += (
            "\n## Training curves\n\n"
            f"`{run['command']}`; held-out KL and recall as the trainer measures them (pooled as in the loss, "
            "over the keys after the sinks, exact top-B of the pooled target among the pooled prediction's top-B; "
            "its own held-out prompts, not the ones above).\n\n"
            + curves(history, config["batch_size"] / config["reuse"])
            + "\n"
        )
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"recall": recall, "kl": kl, "rows": rows}, indent=1))
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
