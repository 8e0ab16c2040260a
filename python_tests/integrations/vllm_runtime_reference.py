"""The HF runtime's eviction of prompts, for the vLLM tests to compare against (run with a Python
that has the runtime: transformers < 5.3, which vLLM's environment cannot have).

    python vllm_runtime_reference.py reference.json < request.json

request: {"prompts": [[token ids], ...], "policies": [...], "budget": int, "max_new_tokens": int}.
reference: per policy, per prompt: {"kept": per layer [Hkv][M] positions, "tokens": greedy answer}.
LookaheadKV runs with its shipped module and uniform budgets (depth_ramp 0), as vLLM runs it.
"""

from __future__ import annotations

import json
import sys

import torch

from lookaheadkv_kernels.runtime import LookaheadKV, LookaheadModule, load_model, make_policy, prefill_and_evict
from lookaheadkv_kernels.runtime.eviction import decode_greedy


def main() -> None:
    request = json.load(sys.stdin)
    model, _ = load_model("smollm2")
    result = {}
    for name in request["policies"]:
        policy = (
            LookaheadKV(LookaheadModule.shipped(model), depth_ramp=0.0) if name == "lookaheadkv" else make_policy(name)
        )
        runs = []
        for prompt in request["prompts"]:
            eviction = prefill_and_evict(model, torch.tensor([prompt]), policy, request["budget"])
            tokens = decode_greedy(model, [eviction], request["max_new_tokens"])[0]
            runs.append({"kept": [kept[0].tolist() for kept in eviction.kept], "tokens": tokens})
        result[name] = runs
    with open(sys.argv[1], "w") as out:
        json.dump(result, out)


if __name__ == "__main__":
    main()
