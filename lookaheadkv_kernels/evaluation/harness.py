"""`lookaheadkv eval`: the task suite under every policy and budget, resumable, with tables and plots.

Each prompt is prefilled once (`replay.capture_prefill`); the full-cache greedy answer is decoded
from it; then every (policy, budget) evicts a copy of that cache and decodes its own greedy answer.
One JSON line per (sample, policy, budget) is appended to `<out>/eval_<name>.jsonl` as soon as it
exists, so an interrupted run continues where it stopped; a sample whose records are all present is
not prefilled again. The CSV, markdown and PNG outputs are rebuilt from the JSONL at the end (and by
`--report-only`).
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch

from ..argtypes import (
    CommandParser,
    existing_dir,
    int_list,
    load_errors_reported,
    model_source,
    nonnegative_int,
    parse_option,
    positive_int,
)
from .policies import (
    ALL_POLICIES,
    FULL,
    MODULE_POLICIES,
    PEER_POLICIES,
    build_policy,
    load_lookahead,
    parse_budgets,
    parse_policies,
)
from .tasks import DEFAULT_SEED, LENGTHS, MIN_LENGTH, TASKS, make_sample, parse_tasks, prompt_ids, score

DEFAULT_OUT = Path("bench/results")
DEFAULT_BUDGETS = "64,128,256,512"
QUICK = {
    "tasks": "niah_single,niah_multikey,variable_tracking,fact_qa",
    "lengths": "1024,2048",
    "samples": 1,
    "budgets": "128",
    "policies": "full,lookaheadkv,snapkv,streamingllm,laq",
}


def record_key(record: dict) -> tuple:
    return record["uid"], record["policy"], str(record["budget"])


class ResultStore:
    """Append-only JSONL of finished records, keyed by (sample uid, policy, budget)."""

    def __init__(self, path: Path):
        self.path = path
        self.records: dict[tuple, dict] = {}
        if path.is_file():
            text = path.read_text()
            if text and not text.endswith("\n"):  # a run killed mid-write: drop its partial last record
                text = text[: text.rfind("\n") + 1]
                path.write_text(text)
            for line in text.splitlines():
                if line.strip():
                    record = json.loads(line)
                    self.records[record_key(record)] = record

    def has(self, uid: str, policy: str, budget) -> bool:
        return (uid, policy, str(budget)) in self.records

    def add(self, record: dict) -> None:
        self.records[record_key(record)] = record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as out:
            out.write(json.dumps(record) + "\n")


def _jobs(policies, budgets):
    """(policy, budget) pairs of one sample, full cache first (its answer is every policy's reference)."""
    jobs = [(FULL, FULL)] if FULL in policies else []
    return jobs + [(policy, budget) for policy in policies if policy != FULL for budget in budgets]


def evaluate(model, tokenizer, samples, policies, budgets, store: ResultStore, *, module=None, progress=True):
    """Run every missing (sample, policy, budget) and append its record to `store`."""
    from tqdm import tqdm

    from .kvpress_peers import press_evict
    from .replay import capture_prefill, decode, evict

    runtime_policies = {
        name: build_policy(name, module, model) for name in policies if name != FULL and name not in PEER_POLICIES
    }
    jobs = _jobs(policies, budgets)
    todo = [s for s in samples if any(not store.has(s.uid, p, b) for p, b in jobs)]
    bar = tqdm(total=len(todo) * len(jobs), disable=not progress, desc="eval", unit="run", file=sys.stderr)
    device = next(model.parameters()).device
    for sample in todo:
        ids = torch.tensor([prompt_ids(sample, tokenizer)], device=device)
        bar.set_postfix_str(f"{sample.uid} prefill {ids.shape[1]} tokens")
        prefill = capture_prefill(model, ids)
        # The full-cache greedy answer, long enough to serve as SpecKV's self-draft and Oracle's answer.
        continuation = decode(model, prefill, prefill.full_cache(), max(sample.max_new_tokens, 32))
        base = {
            "uid": sample.uid,
            "task": sample.task,
            "length": sample.length,
            "index": sample.index,
            "prompt_tokens": prefill.num_prompt,
            "answers": list(sample.answers),
        }
        for policy, budget in jobs:
            if store.has(sample.uid, policy, budget):
                bar.update()
                continue
            bar.set_postfix_str(f"{sample.uid} {policy}@{budget}")
            if policy == FULL:
                tokens, seconds, kept = continuation[:, : sample.max_new_tokens], 0.0, prefill.full_cache_bytes()
            else:
                if policy in PEER_POLICIES:
                    replay = press_evict(model, prefill, policy, budget, module=module)
                else:
                    replay = evict(
                        model,
                        prefill,
                        runtime_policies[policy],
                        budget,
                        max_new_tokens=sample.max_new_tokens,
                        continuation=continuation,
                    )
                tokens = decode(model, prefill, replay.cache, sample.max_new_tokens)
                seconds, kept = replay.seconds, replay.kept_bytes
            text = tokenizer.decode(tokens[0].tolist(), skip_special_tokens=True)
            store.add(
                {
                    **base,
                    "policy": policy,
                    "budget": budget,
                    "prediction": text,
                    "score": 100.0 * score(text, sample.answers),
                    "evict_seconds": seconds,
                    "prefill_seconds": prefill.seconds,
                    "kept_bytes": kept,
                    "full_bytes": prefill.full_cache_bytes(),
                }
            )
            bar.update()
    bar.close()


def _parser():
    parser = CommandParser(
        prog="lookaheadkv eval",
        description="RULER-style long-context suite: LookaheadKV against heuristic, draft-based and kvpress policies.",
    )
    parser.add_argument("--quick", action="store_true", help=f"a few-minute subset: {QUICK}")
    parser.add_argument(
        "--model",
        type=model_source,
        default="smollm2",
        help="'smollm2' (embedded, the default) or a local HF checkpoint directory",
    )
    parser.add_argument(
        "--module",
        type=existing_dir,
        default=None,
        help="lookahead module directory (default: the one shipped for the model)",
    )
    parser.add_argument(
        "--tasks", default=",".join(TASKS), help=f"comma-separated tasks, from {', '.join(TASKS)} (default: all)"
    )
    parser.add_argument(
        "--lengths",
        default=",".join(map(str, LENGTHS)),
        help=f"prompt lengths in tokens, each >= {MIN_LENGTH} (default: %(default)s)",
    )
    parser.add_argument("--samples", type=positive_int, default=3, help="samples per task and length")
    parser.add_argument(
        "--first-sample",
        type=nonnegative_int,
        default=0,
        help="index of the first sample (the reported suite starts at 0; bench/lookaheadkv_scoring_sweep.py tunes on 1-2)",
    )
    parser.add_argument(
        "--policies",
        default=",".join(ALL_POLICIES),
        help=f"comma-separated policies, from {', '.join(ALL_POLICIES)} (default: all)",
    )
    parser.add_argument(
        "--budgets",
        default=DEFAULT_BUDGETS,
        help="ints = tokens per layer and KV head (a mean over layers for per-layer schedules), decimals = ratios "
        "(default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the samples (default: %(default)s)")
    parser.add_argument("--name", default=None, help="results name: <out>/eval_<name>.* (default 'quick' or 'full')")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory (default: %(default)s)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    parser.add_argument("--report-only", action="store_true", help="rebuild the CSV/markdown/plots from the JSONL")
    parser.add_argument(
        "--report-name",
        default=None,
        help="write the tables as <out>/eval_<report-name>.* (default: --name), e.g. a subset of lengths/budgets",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.quick:
        defaults = parser.parse_args([])
        for key, value in QUICK.items():
            if getattr(args, key) == getattr(defaults, key):
                setattr(args, key, value)
    policies = parse_option(parser, "--policies", parse_policies, args.policies)
    budgets = parse_option(parser, "--budgets", parse_budgets, args.budgets)
    tasks = parse_option(parser, "--tasks", parse_tasks, args.tasks)
    lengths = parse_option(parser, "--lengths", int_list(MIN_LENGTH), args.lengths)
    name = args.name or ("quick" if args.quick else "full")
    jsonl = args.out / f"eval_{name}.jsonl"
    store = ResultStore(jsonl)
    if args.report_only and not store.records:
        parser.error(f"--report-only: no records in {jsonl}")

    from .report import write_report

    if not args.report_only:
        from transformers.utils import logging as hf_logging

        from ..runtime.models import load_model

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        if args.threads:
            torch.set_num_threads(args.threads)
        with load_errors_reported(parser, "--model"):
            model, tokenizer = load_model(args.model)
        module = module_dir = None
        if any(p in MODULE_POLICIES for p in policies):
            with load_errors_reported(parser, "--module"):
                module, module_dir = load_lookahead(model, args.module)
        if any(p in PEER_POLICIES for p in policies):
            from .kvpress_peers import kvpress_version

            try:
                print(f"kvpress {kvpress_version()}", file=sys.stderr)
            except ImportError as error:
                if args.policies != _parser().get_default("policies"):
                    parser.exit(1, f"{parser.prog}: error: --policies: the kvpress peers are unavailable: {error}\n")
                print(f"leaving out the kvpress peers: {error}", file=sys.stderr)
                policies = [p for p in policies if p not in PEER_POLICIES]
        start = time.perf_counter()
        indices = range(args.first_sample, args.first_sample + args.samples)
        samples = [make_sample(t, n, i, tokenizer, args.seed) for n in lengths for t in tasks for i in indices]
        print(
            f"{len(samples)} samples x {len(policies)} policies; budgets {budgets}; module {module_dir}; "
            f"results -> {jsonl}",
            file=sys.stderr,
        )
        continuing = bool(store.records)  # earlier runs' records stay; so does their line in the meta file
        evaluate(model, tokenizer, samples, policies, budgets, store, module=module, progress=not args.no_progress)
        run = {
            "command": "lookaheadkv eval " + " ".join(argv if argv is not None else sys.argv[1:]),
            "model": args.model,
            "module": str(module_dir) if module_dir else None,
            "seed": args.seed,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "threads": torch.get_num_threads(),
            "seconds": round(time.perf_counter() - start, 1),
        }
        meta_path = args.out / f"eval_{name}.meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() and continuing else {}
        runs = meta.get("runs", [meta] if meta else [])  # one entry per run that added to this results file
        meta_path.write_text(json.dumps({"runs": runs + [run]}, indent=2) + "\n")
    written = write_report(
        store,
        args.out,
        args.report_name or name,
        budgets=budgets,
        policies=policies,
        lengths=lengths,
        tasks=tasks,
        meta_name=name,
    )
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
