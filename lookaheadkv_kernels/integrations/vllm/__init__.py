"""LookaheadKV eviction inside vLLM (V1 engine): a general plugin, installed with the `vllm` extra.

vLLM loads `register` (entry point group `vllm.general_plugins`) in every process it starts. It
changes nothing until an engine is started with eviction settings:

    LLM(model=..., additional_config={"lookaheadkv": {"policy": "lookaheadkv", "budget": 128}})
    vllm serve MODEL --additional-config '{"lookaheadkv": {"policy": "snapkv", "budget": 256}}'

Requests may override the policy, budget and module (`SamplingParams(extra_args={"lookaheadkv_policy":
"streamingllm"})`, `vllm_xargs` in an OpenAI request). docs/vllm.md describes the design.
"""

_installed = False


def register() -> None:
    """Hook the eviction into vLLM's API process, scheduler and model runner (each a pass-through
    for engines started without eviction settings); once per process."""
    global _installed
    if _installed:
        return
    _installed = True
    from . import frontend, scheduler, worker

    frontend.install()
    scheduler.install()
    worker.install()
