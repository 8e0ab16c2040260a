"""Runtime tests on the real embedded SmolLM2-135M-Instruct (marked `slow`; select with -m slow).

The first use converts the package's GGUF once into $LOOKAHEADKV_CACHE (default
~/.cache/lookaheadkv, ~30 s); later runs reload it in about a second. Prompts stay at a few hundred
tokens so the whole file runs in well under a minute on 2 cores.
"""

import gzip
import json
import warnings
from importlib.resources import files

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from lookaheadkv_kernels.runtime import (  # noqa: E402
    LookaheadKV,
    LookaheadModule,
    depth_ramp_budgets,
    encode_prompt,
    generate,
    load_model,
    make_policy,
    policy_names,
    prefill_and_evict,
)
from lookaheadkv_kernels.runtime.models import smollm2_gguf_path  # noqa: E402
from lookaheadkv_kernels.runtime.policies import DEFAULT_NUM_SINK, LOOKAHEAD_DEPTH_RAMP  # noqa: E402

pytestmark = pytest.mark.slow
NEEDLE = "The secret code of the vault is 4821."


@pytest.fixture(scope="module")
def smollm2():
    try:
        smollm2_gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model("smollm2")


@pytest.fixture(scope="module")
def needle_ids(smollm2):
    """A ~360-token chat prompt: Bible filler with one fact in the middle, then a question about it."""
    _, tokenizer = smollm2
    verses = gzip.decompress(files("lookaheadkv_kernels.data").joinpath("kjv_eval.txt.gz").read_bytes()).decode()
    filler = " ".join(verses.splitlines()[:12])
    middle = len(filler) // 2
    context = f"{filler[:middle]} {NEEDLE} {filler[middle:]}"
    return encode_prompt(tokenizer, f"{context}\n\nWhat is the secret code of the vault?", None, "cpu")


def test_converted_checkpoint_and_tokenizer(smollm2, needle_ids):
    model, tokenizer = smollm2
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert next(model.parameters()).dtype == torch.float32
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert needle_ids[0, 0] == im_start and needle_ids[0, 1] != im_start  # one <|im_start|>, not two
    assert tokenizer.eos_token == "<|im_end|>" and model.generation_config.eos_token_id == 2
    assert 300 < needle_ids.shape[1] < 420


def test_shipped_module_names_its_base_model_portably(smollm2):
    from lookaheadkv_kernels.runtime.lookahead import CONFIG_FILE, shipped_module_dir

    model, _ = smollm2
    assert model.config._name_or_path == "smollm2"  # what a module trained on it records, never a cache path
    saved = json.loads((shipped_module_dir(model) / CONFIG_FILE).read_text())
    assert saved["base_model"] == "smollm2"


def test_full_cache_answer_finds_the_needle(smollm2, needle_ids):
    model, tokenizer = smollm2
    result = generate(model, tokenizer, needle_ids, policy="snapkv", budget=1.0, max_new_tokens=16)
    assert "4821" in result.text


def test_budget_at_least_prompt_generates_full_cache_tokens(smollm2, needle_ids):
    model, tokenizer = smollm2
    ids = needle_ids
    expected = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    expected = expected[0, ids.shape[1] :].tolist()
    options = {"lookaheadkv": dict(module=LookaheadModule(model))}
    policies = [make_policy(name, model, **options.get(name, {})) for name in policy_names()]
    for policy in policies:
        result = generate(model, tokenizer, ids, policy=policy, budget=ids.shape[1], max_new_tokens=8)
        assert result.token_ids == expected, policy


def test_lookahead_eviction_keeps_prompt_logits_and_evicts_each_layer(smollm2, needle_ids):
    model, _ = smollm2
    ids, budget = needle_ids, 64
    with torch.no_grad():
        plain = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    eviction = prefill_and_evict(model, ids, LookaheadKV(LookaheadModule(model, seed=7)), budget)
    assert torch.equal(eviction.next_logits, plain.logits[:, -1])
    budgets = depth_ramp_budgets(budget, ids.shape[1], 30, LOOKAHEAD_DEPTH_RAMP, DEFAULT_NUM_SINK + 1)
    assert budgets[0] < budget < budgets[-1] and sum(budgets) == 30 * budget  # the default depth ramp
    assert eviction.stats.budgets == eviction.cache.stored_lengths() == budgets
    assert eviction.cache.get_seq_length() == ids.shape[1]
    for layer, full, kept in zip(eviction.cache.layers, plain.past_key_values.layers, eviction.kept):
        index = kept[..., None].expand(-1, -1, -1, full.keys.shape[-1])
        assert torch.equal(layer.keys, full.keys.gather(2, index))
    stats = eviction.stats
    # The first 29 layers compacted and the last one full at the worst moment, against all 30 layers full
    assert stats.peak_cache_bytes == stats.full_cache_bytes * (sum(budgets[:29]) + ids.shape[1]) // (30 * ids.shape[1])


def test_lookaheadkv_by_name_uses_the_shipped_module(smollm2, needle_ids):
    model, tokenizer = smollm2
    by_name = generate(model, tokenizer, needle_ids, policy="lookaheadkv", budget=64, max_new_tokens=4)
    shipped = LookaheadKV(LookaheadModule.shipped(model))
    assert not shipped.module.training
    explicit = generate(model, tokenizer, needle_ids, policy=shipped, budget=64, max_new_tokens=4)
    assert by_name.token_ids == explicit.token_ids
    assert by_name.eviction.kept == shipped.layer_budgets(64, needle_ids.shape[1], 30)


def test_oracle_keeps_what_the_answer_needs(smollm2, needle_ids):
    model, tokenizer = smollm2
    result = generate(model, tokenizer, needle_ids, policy="oracle", budget=64, max_new_tokens=16)
    assert "4821" in result.text
    assert result.eviction.kept == [64] * 30
