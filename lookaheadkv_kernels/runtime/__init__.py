"""LookaheadKV in a real runtime: HF transformers models, lookahead modules, and baseline policies.

    from lookaheadkv_kernels.runtime import load_model, generate, LookaheadModule, LookaheadKV
    model, tokenizer = load_model("smollm2")            # the embedded SmolLM2-135M-Instruct
    result = generate(model, tokenizer, "Summarise ...", policy="snapkv", budget=128, max_new_tokens=64)
    result = generate(model, tokenizer, prompt, policy="lookaheadkv", budget=128)  # the module shipped for the model
    result = generate(model, tokenizer, prompt, policy=LookaheadKV(LookaheadModule.load(path, model)), budget=0.25)

Every policy scores through the ops (`lookahead_qproj`, `attention_scores`, `lookahead_attention`)
and compacts through `select_compact`. `prefill_and_evict` (prefill + evict) and `evict_cache`
(evict a cache the caller prefilled) are the lower-level entries for runtimes that decode themselves. Needs the `runtime` extra (transformers, safetensors, gguf).
"""

from .compat import check_transformers

check_transformers()

from .cache import CompactedCache, CompactedLayer, ragged_masks  # noqa: E402
from .eviction import (  # noqa: E402
    Eviction,
    EvictionStats,
    GenerationResult,
    encode_prompt,
    eos_ids,
    evict_cache,
    generate,
    prefill_and_evict,
    resolve_budget,
)
from .lookahead import LookaheadConfig, LookaheadModule, lookahead_stream  # noqa: E402
from .models import SMOLLM2_INSTALL, UnsupportedModelError, cache_dir, load_model, smollm2_checkpoint  # noqa: E402
from .policies import (  # noqa: E402
    LAQ,
    POLICIES,
    KNorm,
    LookaheadKV,
    Oracle,
    Policy,
    PyramidKV,
    RandomPolicy,
    SnapKV,
    SpecKV,
    StreamingLLM,
    depth_ramp_budgets,
    make_policy,
    policy_names,
    register,
)

__all__ = [
    "CompactedCache",
    "CompactedLayer",
    "ragged_masks",
    "Eviction",
    "EvictionStats",
    "GenerationResult",
    "encode_prompt",
    "eos_ids",
    "evict_cache",
    "generate",
    "prefill_and_evict",
    "resolve_budget",
    "LookaheadConfig",
    "LookaheadModule",
    "lookahead_stream",
    "SMOLLM2_INSTALL",
    "UnsupportedModelError",
    "cache_dir",
    "load_model",
    "smollm2_checkpoint",
    "LAQ",
    "POLICIES",
    "KNorm",
    "LookaheadKV",
    "Oracle",
    "Policy",
    "PyramidKV",
    "RandomPolicy",
    "SnapKV",
    "SpecKV",
    "StreamingLLM",
    "depth_ramp_budgets",
    "make_policy",
    "policy_names",
    "register",
]
