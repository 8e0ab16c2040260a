"""Throughput of batched `generate` against one call per prompt, on SmolLM2 (CPU).

Eight chat prompts of different lengths (Bible filler around one fact, then a question) are
answered twice with the same policy and budget: in one `generate` call with the list, and in eight
calls, one per prompt. EOS is ignored, so every answer has exactly --max-new-tokens tokens and both
ways decode the same number. Each way is timed --repeats times (best kept: load from other
processes inflates it least); the prefill + eviction part (the same work both ways: a batch evicts
each prompt on its own) is reported apart from the decoding. Writes a markdown report:

    python bench/batched_generate.py > bench/results/batched_generate_cpu.md
"""

from __future__ import annotations

import argparse
import gzip
import os
import platform
import sys
import time
import warnings
from importlib.resources import files

import torch
from provenance import provenance

from lookaheadkv_kernels.runtime import generate, load_model, make_policy

RESULTS = "bench/results/batched_generate_cpu.md"

FACTS = [
    "The code of the vault is 4821.",
    "Anna Berg lives in Oslo.",
    "The key is under the red mat.",
    "Tom owns seven cats.",
    "The meeting is on Tuesday at noon.",
    "The password is heliotrope.",
    "The ship sails from Genoa.",
    "Mira was born in 1987.",
]


def prompts(verses_per_prompt: list[int]) -> list[str]:
    verses = gzip.decompress(files("lookaheadkv_kernels.data").joinpath("kjv_eval.txt.gz").read_bytes()).decode()
    verses = verses.splitlines()
    out, start = [], 0
    for fact, count in zip(FACTS, verses_per_prompt):
        filler = verses[start : start + count]
        start += count
        middle = len(filler) // 2
        text = " ".join(filler[:middle] + [fact] + filler[middle:])
        out.append(f"{text}\n\nWhat fact about a person, a place, a number or a thing is stated above? Explain.")
    return out


def best_of(repeats, run):
    """(best wall seconds, best prefill + eviction seconds) of `run`, which returns its results."""
    walls, evictions = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        results = run()
        walls.append(time.perf_counter() - start)
        evictions.append(sum(r.eviction.seconds for r in results))
    return min(walls), min(evictions)


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="lookaheadkv", help="runtime policy name")
    parser.add_argument("--budget", type=int, default=128, help="KV entries kept per layer")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens decoded per prompt")
    parser.add_argument(
        "--verses", default="10,14,18,22,26,30,34,38", help="filler verses of each of the 8 prompts (sets their length)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timings per way (best kept)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)

    model, tokenizer = load_model("smollm2")
    model.generation_config.eos_token_id = None  # every answer runs to max_new_tokens
    texts = prompts([int(v) for v in args.verses.split(",")])
    policy = make_policy(args.policy, model=model)
    options = dict(policy=policy, budget=args.budget, max_new_tokens=args.max_new_tokens)

    batch = generate(model, tokenizer, texts, **options)  # warm-up, and the tokens both ways must give
    alone = [generate(model, tokenizer, t, **options) for t in texts]
    if [r.token_ids for r in batch] != [r.token_ids for r in alone]:
        raise SystemExit("batched tokens differ from one call per prompt")
    lengths = [r.prompt_ids.shape[1] for r in batch]

    single_wall, single_evict = best_of(args.repeats, lambda: [generate(model, tokenizer, t, **options) for t in texts])
    batch_wall, batch_evict = best_of(args.repeats, lambda: generate(model, tokenizer, texts, **options))
    tokens = len(texts) * args.max_new_tokens

    print(f"# Batched generate vs one call per prompt, SmolLM2-135M-Instruct fp32 on CPU ({args.threads} threads)\n")
    print(provenance(RESULTS).rstrip("\n") + f"; {cpu_name()}; load average {os.getloadavg()[0]:.1f} at the end\n")
    print(
        f"{len(texts)} prompts of {min(lengths)}-{max(lengths)} tokens ({', '.join(map(str, lengths))}), "
        f"policy {args.policy}, budget {args.budget}, {args.max_new_tokens} new tokens each (EOS ignored), "
        f"best of {args.repeats}; the batch's tokens equal the single calls'\n"
    )
    print("| way | wall s | prefill + eviction s | decoding s | new tokens/s |")
    print("|---|---|---|---|---|")
    for name, wall, evict in (
        ("8 single calls", single_wall, single_evict),
        ("one batch of 8", batch_wall, batch_evict),
    ):
        print(f"| {name} | {wall:.2f} | {evict:.2f} | {wall - evict:.2f} | {tokens / wall:.1f} |")
    print(
        f"\nBatch of 8 over 8 single calls: {single_wall / batch_wall:.2f}x the throughput end to end, "
        f"{(single_wall - single_evict) / (batch_wall - batch_evict):.2f}x in the decoding."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
