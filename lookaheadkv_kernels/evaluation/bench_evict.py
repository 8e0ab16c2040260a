"""`lookaheadkv bench-evict`: time to first token and eviction overhead per policy.

For each prompt length, every policy runs the runtime's real path, `prefill_and_evict` (the model's
prefill with the policy's eviction interleaved, drafting included), and the first token is taken
from its logits: that wall time is the TTFT. The plain prefill is the same call with a budget no
smaller than the prompt (nothing is scored or evicted). Overhead = median TTFT − median plain TTFT,
as a percent of the plain prefill and as a ratio to LookaheadKV's. Repeats visit the policies in a
rotated order so that drift in the machine's load spreads over all of them.

A difference of two ~seconds-long medians is noisy on a shared CPU, so the eviction work is also
timed on its own: the same eviction replayed on a captured prefill (`replay.evict`), which runs
exactly the policy's scoring, drafting and compaction and nothing else.

Memory: the most K/V bytes alive at once during prefill + eviction (the runtime's accounting:
LAQ keeps the full cache until its draft is done) and, on CUDA, torch's peak allocated bytes.
"""

from __future__ import annotations

import json
import platform
import statistics
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
    parse_option,
    positive_int,
    torch_device,
)
from .policies import ALL_POLICIES, FULL, MODULE_POLICIES, PEER_POLICIES, build_policy, load_lookahead, parse_policies
from .tasks import MIN_LENGTH, make_sample, prompt_ids

DEFAULT_POLICIES = "lookaheadkv,snapkv,pyramidkv,streamingllm,laq,speckv"
PLAIN = "plain prefill"
TARGET_VS_SNAPKV = 2.0  # LookaheadKV's overhead at most 2x SnapKV's
TARGET_DRAFT_RATIO = 15.0  # LAQ's and SpecKV's overhead at least 15x LookaheadKV's


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ttft(model, ids, policy, budget, max_new_tokens):
    from ..runtime.eviction import prefill_and_evict

    device = ids.device
    _sync(device)
    start = time.perf_counter()
    eviction = prefill_and_evict(model, ids, policy, budget, max_new_tokens=max_new_tokens)
    first = eviction.next_logits.argmax(-1)
    _sync(device)
    seconds = time.perf_counter() - start
    return seconds, eviction.stats, int(first)


def bench_length(model, tokenizer, length, policies, module, budget, repeats, max_new_tokens, progress):
    from .replay import capture_prefill, evict

    device = next(model.parameters()).device
    sample = make_sample("niah_single", length, 0, tokenizer)
    ids = torch.tensor([prompt_ids(sample, tokenizer)], device=device)
    num_prompt = ids.shape[1]
    names = [PLAIN] + policies
    built = {name: build_policy(name, module, model) for name in policies}
    times = {name: [] for name in names}
    stats = {}
    _ttft(model, ids[:, : min(num_prompt, 256)], "snapkv", num_prompt, max_new_tokens)  # warm-up
    for repeat in range(repeats):
        order = names[repeat % len(names) :] + names[: repeat % len(names)]
        for name in order:
            policy, policy_budget = ("snapkv", num_prompt) if name == PLAIN else (built[name], budget)
            seconds, stat, _ = _ttft(model, ids, policy, policy_budget, max_new_tokens)
            times[name].append(seconds)
            stats[name] = stat
            progress(f"{length} tokens, repeat {repeat + 1}/{repeats}: {name} {seconds:.2f} s")

    # The eviction work alone, replayed on one captured prefill.
    # Without a continuation, drafting policies draft for themselves here: their real cost.
    prefill = capture_prefill(model, ids)
    work = {}
    for name in policies:
        runs = []
        for _ in range(repeats):
            _sync(device)
            runs.append(evict(model, prefill, built[name], budget, max_new_tokens=max_new_tokens).seconds)
        work[name] = statistics.median(runs)

    plain = statistics.median(times[PLAIN])
    rows = []
    for name in names:
        ttft = statistics.median(times[name])
        stat = stats[name]
        rows.append(
            {
                "length": length,
                "prompt_tokens": num_prompt,
                "policy": name,
                "budget": None if name == PLAIN else budget,
                "ttft_ms": 1000 * ttft,
                "ttft_runs_ms": [round(1000 * t, 1) for t in times[name]],
                "overhead_ms": None if name == PLAIN else 1000 * (ttft - plain),
                "overhead_percent": None if name == PLAIN else 100 * (ttft - plain) / plain,
                "eviction_work_ms": None if name == PLAIN else 1000 * work[name],
                "eviction_work_percent": None if name == PLAIN else 100 * work[name] / plain,
                "peak_kv_bytes": stat.peak_cache_bytes,
                "kept_kv_bytes": _kept_bytes(stat, model),
                "peak_device_bytes": stat.peak_device_bytes,
            }
        )
    for row in rows:
        for key in ("overhead_ms", "eviction_work_ms"):
            la = next((r[key] for r in rows if r["policy"] == "lookaheadkv"), None)
            row[key.replace("_ms", "_ratio_to_lookaheadkv")] = (
                row[key] / la if row[key] is not None and la and la > 0 else None
            )
    return rows


def _kept_bytes(stat, model):
    per_entry = stat.full_cache_bytes // (stat.num_prompt * len(stat.budgets))
    return per_entry * sum(stat.kept)


def _fmt(value, spec=".1f"):
    return "—" if value is None else format(value, spec)


def markdown(rows, meta) -> str:
    lines = [
        f"Command: `{meta['command']}`  ",
        f"Device: {meta['device']}; {meta['threads']} CPU threads; budget {meta['budget']}; median of {meta['repeats']}; "
        f"module `{meta['module']}`.",
        "",
        "| length | policy | TTFT ms | overhead ms | overhead % | × LookaheadKV | eviction work ms | work % | "
        "work × LookaheadKV | peak KV MiB | kept KV MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['prompt_tokens']} | {r['policy']} | {_fmt(r['ttft_ms'], '.0f')} | {_fmt(r['overhead_ms'], '+.0f')} | "
            f"{_fmt(r['overhead_percent'], '+.1f')} | {_fmt(r['overhead_ratio_to_lookaheadkv'])} | "
            f"{_fmt(r['eviction_work_ms'], '.1f')} | {_fmt(r['eviction_work_percent'], '.2f')} | "
            f"{_fmt(r['eviction_work_ratio_to_lookaheadkv'])} | {r['peak_kv_bytes'] / 2**20:.1f} | "
            f"{r['kept_kv_bytes'] / 2**20:.2f} |"
        )
    lines += [
        "",
        "Targets (on the isolated eviction work, and on the TTFT overhead; a TTFT overhead smaller than "
        "the plain prefill's run-to-run spread is noise, and no ratio is taken with it):",
        "",
    ]
    for length in sorted({r["length"] for r in rows}):
        by = {r["policy"]: r for r in rows if r["length"] == length}
        if "lookaheadkv" not in by:
            continue
        plain_runs = by[PLAIN]["ttft_runs_ms"] if PLAIN in by else [0.0]
        spread = max(plain_runs) - min(plain_runs)
        for key, label in (("eviction_work_ms", "work"), ("overhead_ms", "TTFT overhead")):
            la = by["lookaheadkv"][key]
            floor = spread if key == "overhead_ms" else 0.0
            if la is None or la <= floor:
                lines.append(
                    f"- {length} tokens, {label}: LookaheadKV's {_fmt(la, '+.0f')} ms is within the plain "
                    f"prefill's run-to-run spread ({spread:.0f} ms): no ratio"
                )
                continue
            checks = []
            if "snapkv" in by and by["snapkv"][key] is not None and by["snapkv"][key] > floor:
                ratio = la / by["snapkv"][key]
                checks.append(
                    f"LookaheadKV/SnapKV {ratio:.2f}× ({'met' if ratio <= TARGET_VS_SNAPKV else 'not met'}, ≤ 2×)"
                )
            elif "snapkv" in by:
                checks.append("SnapKV's overhead is within the spread: no LookaheadKV/SnapKV ratio")
            for name in ("laq", "speckv"):
                if name in by:
                    ratio = by[name][key] / la
                    checks.append(
                        f"{name}/LookaheadKV {ratio:.1f}× ({'met' if ratio >= TARGET_DRAFT_RATIO else 'not met'}, ≥ 15×)"
                    )
            lines.append(f"- {length} tokens, {label}: " + "; ".join(checks))
    return "\n".join(lines) + "\n"


def _parser():
    parser = CommandParser(prog="lookaheadkv bench-evict", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="lengths 1024,2048, 2 repeats")
    parser.add_argument(
        "--model",
        type=model_source,
        default="smollm2",
        help="'smollm2' (embedded, the default) or a local HF checkpoint directory",
    )
    parser.add_argument(
        "--module", type=existing_dir, default=None, help="lookahead module directory (default: the shipped one)"
    )
    parser.add_argument(
        "--device",
        type=torch_device,
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda[:N] (default: %(default)s)",
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "float16", "bfloat16"),
        help="float32 (CPU default) or bfloat16 (CUDA default)",
    )
    parser.add_argument("--lengths", default=None, help="prompt lengths (default 1024,2048,4096,8192)")
    parser.add_argument(
        "--policies",
        default=DEFAULT_POLICIES,
        help=f"comma-separated policies to time, from {', '.join(p for p in ALL_POLICIES if p not in (FULL, *PEER_POLICIES))} "
        "(default: %(default)s)",
    )
    parser.add_argument("--budget", type=positive_int, default=128, help="KV entries kept per layer and head")
    parser.add_argument("--repeats", type=positive_int, default=None, help="timed runs per policy (default 3)")
    parser.add_argument(
        "--max-new-tokens", type=positive_int, default=32, help="answer length drafting policies plan for"
    )
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--name", default=None, help="results: <out>/bench_evict_<name>.{json,md} (default: the device type)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("bench/results"), help="results directory (default: %(default)s)"
    )
    return parser


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    lengths = parse_option(
        parser,
        "--lengths",
        int_list(MIN_LENGTH),
        args.lengths or ("1024,2048" if args.quick else "1024,2048,4096,8192"),
    )
    repeats = args.repeats or (2 if args.quick else 3)
    policies = [p for p in parse_option(parser, "--policies", parse_policies, args.policies) if p != FULL]
    if any(p in PEER_POLICIES for p in policies):
        parser.error(
            "argument --policies: bench-evict times the runtime's policies; kvpress peers are compared by `lookaheadkv eval`"
        )
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)

    from transformers.utils import logging as hf_logging

    from ..runtime.models import load_model

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    with load_errors_reported(parser, "--model"):
        model, tokenizer = load_model(args.model, dtype=dtype, device=device)
    module = module_dir = None
    if any(p in MODULE_POLICIES for p in policies):
        with load_errors_reported(parser, "--module"):
            module, module_dir = load_lookahead(model, args.module)
        module.to(device=device, dtype=dtype)

    def progress(message):
        print(message, file=sys.stderr, flush=True)

    name = args.name or device.type
    meta = {
        "command": "lookaheadkv bench-evict " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.machine()}",
        "dtype": str(dtype),
        "threads": torch.get_num_threads(),
        "budget": args.budget,
        "repeats": repeats,
        "module": str(module_dir) if module_dir else None,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for length in lengths:  # results are rewritten after every length, so a stopped run keeps what it measured
        rows += bench_length(
            model, tokenizer, length, policies, module, args.budget, repeats, args.max_new_tokens, progress
        )
        (args.out / f"bench_evict_{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        table = markdown(rows, meta)
        (args.out / f"bench_evict_{name}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
