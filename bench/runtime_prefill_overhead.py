"""Time to first token of the eviction policies against a plain full-cache prefill, on SmolLM2.

Prefill + eviction time of `prefill_and_evict` (best of REPEATS, so load from other processes
inflates it least) for a prompt of LENGTH tokens at one budget. LookaheadKV's module is untrained
(its cost does not depend on the weights):

    python bench/runtime_prefill_overhead.py > bench/results/runtime_prefill_overhead.md
"""

import time
import warnings

import torch
from provenance import provenance

from lookaheadkv_kernels.runtime import LAQ, LookaheadKV, LookaheadModule, SnapKV, SpecKV, load_model, prefill_and_evict

LENGTH, BUDGET, REPEATS = 1024, 128, 3


def best_seconds(model, ids, policy, budget):
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        prefill_and_evict(model, ids, policy, budget, max_new_tokens=32)
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    model, _ = load_model("smollm2")
    ids = torch.randint(100, model.config.vocab_size, (1, LENGTH), generator=torch.Generator().manual_seed(0))
    full = best_seconds(model, ids, SnapKV(), 1.0)
    rows = [("full cache (no eviction)", full)]
    for name, policy in (
        ("SnapKV", SnapKV()),
        ("LookaheadKV (32 rows)", LookaheadKV(LookaheadModule(model))),
        ("LAQ", LAQ()),
        ("SpecKV (self-draft, 32 tokens)", SpecKV()),
    ):
        rows.append((name, best_seconds(model, ids, policy, BUDGET)))
    print(
        f"# Prefill + eviction time, SmolLM2-135M-Instruct fp32 on CPU ({torch.get_num_threads()} threads), "
        f"{LENGTH}-token prompt, budget {BUDGET}, best of {REPEATS}\n"
    )
    print(provenance("bench/results/runtime_prefill_overhead.md"))
    print("| policy | seconds | overhead vs full prefill |")
    print("|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} | {100 * (seconds / full - 1):+.1f} % |")


if __name__ == "__main__":
    main()
