"""Greedy answers of one vLLM engine, in a process of its own (the vLLM tests compare engines that
cannot share a process: one without the plugin's settings, one with tensor parallelism).

    python vllm_generate.py answers.json < request.json

request: {"engine": LLM keyword arguments, "prompts": [[token ids], ...], "max_tokens": int,
"extra_args": [per prompt SamplingParams.extra_args or null]}.
answers (a file: vLLM logs to stdout): {"tokens": [per prompt token ids], "kept": [per prompt, per layer [Hkv][M] positions over all
ranks, or null]} (kept needs "record_kept" in the engine's lookaheadkv settings).
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams

    from lookaheadkv_kernels.integrations.vllm.worker import take_kept_positions

    request = json.load(sys.stdin)
    llm = LLM(**request["engine"])
    params = [
        SamplingParams(max_tokens=request["max_tokens"], temperature=0, extra_args=extra)
        for extra in request["extra_args"]
    ]
    outputs = llm.generate([{"prompt_token_ids": p} for p in request["prompts"]], params, use_tqdm=False)
    kept = [None] * len(outputs)
    if request["engine"].get("additional_config", {}).get("lookaheadkv", {}).get("record_kept"):
        ranks = llm.collective_rpc(take_kept_positions)
        for index, output in enumerate(outputs):
            # The engine's request ids are the API's plus "-" and a random suffix; one eviction each here.
            per_rank = [layers for rank in ranks for r, layers in rank if r.rsplit("-", 1)[0] == output.request_id]
            if per_rank:
                kept[index] = [sum((layers[i].tolist() for layers in per_rank), []) for i in range(len(per_rank[0]))]
    with open(sys.argv[1], "w") as answers:
        json.dump({"tokens": [list(o.outputs[0].token_ids) for o in outputs], "kept": kept}, answers)


if __name__ == "__main__":
    main()
