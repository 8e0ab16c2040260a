"""How many leading tokens should every policy protect? A small measured sweep on SmolLM2.

For each sample of the offline task suite (evaluation/tasks.py) and each policy, generate with
num_sink in SINKS at one budget and record the task score and how many leading tokens agree with
the full-cache greedy answer. Sized for 2 CPU cores (a few minutes):

    python bench/runtime_sink_sweep.py > bench/results/runtime_sink_sweep.md
"""

import sys
import time
import warnings

import torch
from provenance import provenance

from lookaheadkv_kernels.evaluation.tasks import make_sample, prompt_ids, score
from lookaheadkv_kernels.runtime import KNorm, RandomPolicy, SnapKV, generate, load_model

TASKS = ("niah_single", "fact_qa")
LENGTH, SAMPLES, BUDGET = 1024, 3, 96
SINKS = (0, 4, 16)
POLICIES = {
    "snapkv": lambda s: SnapKV(num_sink=s),
    "knorm": lambda s: KNorm(num_sink=s),
    "random": lambda s: RandomPolicy(num_sink=s),
}


def agreement(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main():
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    model, tokenizer = load_model("smollm2")
    samples = [make_sample(t, LENGTH, i, tokenizer) for t in TASKS for i in range(SAMPLES)]
    totals = {(p, s): [0.0, 0] for p in POLICIES for s in SINKS}
    full_score = 0.0
    start = time.time()
    for sample in samples:
        ids = torch.tensor([prompt_ids(sample, tokenizer)])
        full = generate(model, tokenizer, ids, policy="streamingllm", budget=1.0, max_new_tokens=sample.max_new_tokens)
        full_score += score(full.text, sample.answers)
        for name, make in POLICIES.items():
            for sinks in SINKS:
                result = generate(
                    model, tokenizer, ids, policy=make(sinks), budget=BUDGET, max_new_tokens=sample.max_new_tokens
                )
                totals[name, sinks][0] += score(result.text, sample.answers)
                totals[name, sinks][1] += agreement(result.token_ids, full.token_ids)
        print(f"{sample.uid}: {time.time() - start:.0f} s", file=sys.stderr)
    n = len(samples)
    print(
        f"# num_sink sweep: SmolLM2-135M-Instruct, tasks {', '.join(TASKS)} at {LENGTH} tokens, "
        f"{SAMPLES} samples each, budget {BUDGET}\n"
    )
    print(provenance("bench/results/runtime_sink_sweep.md"))
    print(f"Full cache: mean score {full_score / n:.2f}\n")
    print("| policy | num_sink | mean score | mean tokens agreeing with the full-cache answer |")
    print("|---|---|---|---|")
    for (name, sinks), (total, agree) in totals.items():
        print(f"| {name} | {sinks} | {total / n:.2f} | {agree / n:.1f} |")


if __name__ == "__main__":
    main()
