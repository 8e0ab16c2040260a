"""The kvpress integration: LookaheadKVPress keeps what the runtime's LookaheadKV keeps (uniform budgets)
and answers as the runtime does in kvpress's pipeline; the fused SnapKV-style presses keep what
kvpress's own keep. Skipped without kvpress (CI installs it and runs this file after the suite)."""

import subprocess
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
kvpress = pytest.importorskip("kvpress")

from runtime_testing import trained_looking  # noqa: E402

from lookaheadkv_kernels.integrations.kvpress import (  # noqa: E402
    FusedPyramidKVPress,
    FusedSnapKVPress,
    LookaheadKVPress,
)
from lookaheadkv_kernels.runtime import LookaheadKV, LookaheadModule, generate, prefill_and_evict  # noqa: E402

VOCAB = 96


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def tiny_model(family):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    config = {
        "llama": lambda: transformers.LlamaConfig(**common),
        "qwen3": lambda: transformers.Qwen3Config(head_dim=16, **common),
    }[family]()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # make norm weights matter (Qwen3's q_norm included)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def prompt_ids(length, seed=1):
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def ratio_for(budget, num_prompt):
    """The compression ratio at which kvpress keeps `budget` of `num_prompt` entries."""
    return (num_prompt - budget - 0.5) / num_prompt


@torch.no_grad()
def press_prefill(model, ids, press):
    """The cache kvpress's own hooks leave after the prefill (what its pipeline decodes on)."""
    cache = transformers.DynamicCache()
    with press(model):
        model.model(input_ids=ids, past_key_values=cache)
    return cache


def kept_positions(full_keys, kept_keys):
    """Sorted positions [B, H, M] of the kept rows in the full cache (rows of random keys are distinct)."""
    same = (kept_keys[..., :, None, :] == full_keys[..., None, :, :]).all(-1)
    return same.float().argmax(-1).sort(-1).values


def test_importing_the_integrations_package_does_not_import_kvpress():
    code = "import sys, lookaheadkv_kernels.integrations; print('kvpress' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("options", [{}, {"recent": 6, "window_votes": 0.0}, {"num_sink": 0, "pool_kernel": 5}])
def test_lookaheadkv_press_keeps_what_the_runtime_keeps(family, options):
    model = tiny_model(family)
    module = trained_looking(model)
    ids, budget = prompt_ids(90), 30
    cache = press_prefill(model, ids, LookaheadKVPress(ratio_for(budget, 90), module=module, options=options))
    runtime = prefill_and_evict(model, ids, LookaheadKV(module, depth_ramp=0.0, **options), budget)
    for ours, theirs in zip(cache.layers, runtime.cache.layers):
        assert ours.keys.shape[2] == budget
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)


def test_lookaheadkv_press_scores_keep_the_protected_entries_for_kvpress_wrappers():
    model = tiny_model("llama")
    press = LookaheadKVPress(0.5, module=trained_looking(model), options={"recent": 6})
    ids = prompt_ids(50)
    seen = []
    original = press.score

    def record(*args):
        seen.append(original(*args))
        return seen[-1]

    press.score = record
    press_prefill(model, ids, press)
    assert len(seen) == 3
    for scores in seen:
        assert scores.shape == (1, 2, 50)
        assert torch.isinf(scores[..., :4]).all() and torch.isinf(scores[..., -6:]).all()
        assert torch.isfinite(scores[..., 4:-6]).all()


def test_lookaheadkv_press_needs_its_context():
    model = tiny_model("llama")
    press = LookaheadKVPress(0.5, module=trained_looking(model))
    keys = torch.zeros(1, 2, 8, 16)
    with pytest.raises(RuntimeError, match="with press"):
        press.compress(model.model.layers[0].self_attn, torch.zeros(1, 8, 64), keys, keys, None, {})


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize(
    "fused,original,options",
    [
        (FusedSnapKVPress, kvpress.SnapKVPress, {}),
        (FusedSnapKVPress, kvpress.SnapKVPress, {"window_size": 8, "kernel_size": 3}),
        (FusedPyramidKVPress, kvpress.PyramidKVPress, {"window_size": 8}),
    ],
)
def test_fused_snapkv_style_presses_keep_what_kvpress_keeps(family, fused, original, options):
    model = tiny_model(family)
    ids = prompt_ids(120)
    full = transformers.DynamicCache()
    with torch.no_grad():
        model.model(input_ids=ids, past_key_values=full)
    ours = press_prefill(model, ids, fused(compression_ratio=0.6, **options))
    theirs = press_prefill(model, ids, original(compression_ratio=0.6, **options))
    for layer, a, b in zip(full.layers, ours.layers, theirs.layers):
        assert torch.equal(kept_positions(layer.keys, a.keys), kept_positions(layer.keys, b.keys))


def test_fused_press_falls_back_to_kvpress_for_a_wider_kernel_than_the_ops():
    model = tiny_model("llama")
    ids = prompt_ids(100)
    ours = press_prefill(model, ids, FusedSnapKVPress(compression_ratio=0.5, window_size=8, kernel_size=33))
    theirs = press_prefill(model, ids, kvpress.SnapKVPress(compression_ratio=0.5, window_size=8, kernel_size=33))
    assert all(torch.equal(a.keys, b.keys) for a, b in zip(ours.layers, theirs.layers))


# ---- SmolLM2 and its shipped module ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    from lookaheadkv_kernels.runtime import load_model
    from lookaheadkv_kernels.runtime.models import smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    model, tokenizer = load_model("smollm2")
    return model, tokenizer, LookaheadModule.shipped(model)


@pytest.fixture(scope="module")
def demo_sample(smollm2):
    from lookaheadkv_kernels.evaluation.demo import BUILT_IN
    from lookaheadkv_kernels.evaluation.tasks import make_sample

    return make_sample(*BUILT_IN, smollm2[1])


@pytest.mark.slow
def test_smollm2_press_keeps_what_the_runtime_keeps(smollm2, demo_sample):
    model, tokenizer, module = smollm2
    ids = tokenizer(demo_sample.context[:2000], return_tensors="pt").input_ids
    budget = 128
    cache = press_prefill(model, ids, LookaheadKVPress(ratio_for(budget, ids.shape[1])))  # the shipped module
    runtime = prefill_and_evict(model, ids, LookaheadKV(module, depth_ramp=0.0), budget)
    assert all(torch.equal(a.keys, b.keys) for a, b in zip(cache.layers, runtime.cache.layers))
    fused = press_prefill(model, ids, FusedSnapKVPress(compression_ratio=ratio_for(budget, ids.shape[1])))
    original = press_prefill(model, ids, kvpress.SnapKVPress(compression_ratio=ratio_for(budget, ids.shape[1])))
    for a, b in zip(fused.layers, original.layers):
        assert torch.equal(a.keys.sum(-1).sort(-1).values, b.keys.sum(-1).sort(-1).values)


@pytest.mark.slow
@pytest.mark.parametrize("budget", [128, 256, 512])
def test_smollm2_pipeline_answers_as_the_runtime_on_the_demo_prompt(smollm2, demo_sample, budget):
    """kvpress's pipeline with the question in the compressed context (LookaheadKV's rows read the
    question) answers the demo's question as the runtime's `generate` does."""
    from lookaheadkv_kernels.evaluation.tasks import prompt_ids as sample_ids

    model, tokenizer, module = smollm2
    sample = demo_sample
    pipe = transformers.pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)
    context = f"{sample.context}\n\n{sample.question}"
    num_context = len(tokenizer(context).input_ids)  # about the pipeline's context, chat header aside
    press = LookaheadKVPress(compression_ratio=1 - budget / num_context, module=module)
    answer = pipe(
        context, question="", answer_prefix=sample.answer_prefix, press=press, max_new_tokens=sample.max_new_tokens
    )["answer"]
    ids = torch.tensor([sample_ids(sample, tokenizer)])
    runtime = generate(
        model,
        tokenizer,
        ids,
        policy=LookaheadKV(module, depth_ramp=0.0),
        budget=budget,
        max_new_tokens=sample.max_new_tokens,
    )
    assert answer.strip() == runtime.text.strip()
    assert all(a in answer for a in sample.answers)
