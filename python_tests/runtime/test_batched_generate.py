"""Batched `generate`: prompts of different lengths, each evicted on its own and decoded together at its
true positions, get the tokens each gets alone — for every policy, evicted or within budget."""

import gzip
import warnings
from importlib.resources import files

import pytest
import torch

transformers = pytest.importorskip("transformers")

from runtime_testing import trained_looking  # noqa: E402

from lookaheadkv_kernels.runtime import (  # noqa: E402
    LookaheadKV,
    PyramidKV,
    SnapKV,
    encode_prompt,
    generate,
    prefill_and_evict,
)
from lookaheadkv_kernels.runtime.cache import stack_caches  # noqa: E402
from lookaheadkv_kernels.runtime.eviction import prompt_list  # noqa: E402
from lookaheadkv_kernels.runtime.policies import POLICIES  # noqa: E402

VOCAB = 96
LENGTHS = (30, 55, 81)  # the shortest stays within the budget below: its rows are padded


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def tiny_model(family, attn):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        attn_implementation=attn,
    )
    config = {
        "llama": lambda: transformers.LlamaConfig(**common),
        "qwen3": lambda: transformers.Qwen3Config(head_dim=16, **common),
    }[family]()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = None  # random weights: run to max_new_tokens
    model.generation_config.pad_token_id = 0
    return model


def tiny_prompts():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, VOCAB, (1, n), generator=g) for n in LENGTHS]


@pytest.mark.parametrize("family,attn", [("llama", "sdpa"), ("llama", "eager"), ("qwen3", "sdpa")])
def test_batch_equals_each_prompt_alone(family, attn):
    model = tiny_model(family, attn)
    prompts = tiny_prompts()
    policies = [SnapKV(window=8), PyramidKV(window=8), LookaheadKV(trained_looking(model))]  # PyramidKV: ragged
    for policy in policies:
        for budget in (40, max(LENGTHS)):
            batch = generate(model, None, prompts, policy=policy, budget=budget, max_new_tokens=10)
            alone = [generate(model, None, p, policy=policy, budget=budget, max_new_tokens=10) for p in prompts]
            assert [r.token_ids for r in batch] == [r.token_ids for r in alone], (policy, budget)
            assert [r.eviction.kept for r in batch] == [r.eviction.kept for r in alone]
            assert [r.prompt_ids.shape[1] for r in batch] == list(LENGTHS)


def test_within_budget_the_batch_decodes_as_full_cache_generate():
    model = tiny_model("llama", "sdpa")
    prompts = tiny_prompts()
    batch = generate(model, None, prompts, policy="snapkv", budget=1.0, max_new_tokens=10)
    for ids, result in zip(prompts, batch):
        full = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
        assert result.token_ids == full[0, ids.shape[1] :].tolist()


def test_rows_of_a_batch_end_at_their_own_eos():
    model = tiny_model("llama", "sdpa")
    prompts = tiny_prompts()
    alone = [generate(model, None, p, policy="snapkv", budget=40, max_new_tokens=8) for p in prompts]
    model.generation_config.eos_token_id = alone[1].token_ids[3]  # the second prompt now ends at its 4th token
    batch = generate(model, None, prompts, policy="snapkv", budget=40, max_new_tokens=8)
    eos = alone[1].token_ids[3]
    for mine, reference in zip(batch, alone):
        ends = reference.token_ids.index(eos) + 1 if eos in reference.token_ids else None
        assert mine.token_ids == reference.token_ids[:ends]
    assert len(batch[1].token_ids) == 4


def test_stacked_cache_right_aligns_each_row():
    model = tiny_model("llama", "sdpa")
    evictions = [prefill_and_evict(model, p, SnapKV(window=8), 40) for p in tiny_prompts()]
    stacked, pads = stack_caches([e.cache for e in evictions])
    for layer, pad in zip(range(3), pads):
        assert pad.tolist() == [10, 0, 0]  # 30 entries kept whole, 40 of the others
        for row, eviction in enumerate(evictions):
            stored = eviction.cache.layers[layer].keys[0]
            assert torch.equal(stacked.layers[layer].keys[row, :, pad[row] :], stored)
            assert not stacked.layers[layer].keys[row, :, : pad[row]].any()


def test_what_counts_as_a_batch():
    messages = [{"role": "user", "content": "hi"}]
    assert prompt_list("hi") == (["hi"], False)
    assert prompt_list(messages) == ([messages], False)
    assert prompt_list(["a", "b"]) == (["a", "b"], True)
    assert prompt_list([messages, "b"]) == ([messages, "b"], True)
    ids = torch.arange(6).view(2, 3)
    rows, is_batch = prompt_list(ids)
    assert is_batch and [r.tolist() for r in rows] == [[[0, 1, 2]], [[3, 4, 5]]]
    assert prompt_list(ids[:1])[1] is False
    with pytest.raises(ValueError, match="empty list"):
        prompt_list([])


def test_ids_rows_of_a_batch_are_prompts():
    model = tiny_model("llama", "sdpa")
    ids = torch.randint(3, VOCAB, (2, 50), generator=torch.Generator().manual_seed(2))
    batch = generate(model, None, ids, policy="snapkv", budget=40, max_new_tokens=6)
    assert [r.token_ids for r in batch] == [
        generate(model, None, row, policy="snapkv", budget=40, max_new_tokens=6).token_ids for row in ids.split(1)
    ]
    with pytest.raises(ValueError, match="one row"):
        generate(model, None, [ids], policy="snapkv", budget=40, max_new_tokens=6)


# ---- SmolLM2: every policy ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    from lookaheadkv_kernels.runtime import load_model
    from lookaheadkv_kernels.runtime.models import smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    return load_model("smollm2")


@pytest.fixture(scope="module")
def short_prompts(smollm2):
    """Three chat prompts of about 100, 160 and 230 tokens: a fact in Bible filler, then a question."""
    _, tokenizer = smollm2
    verses = gzip.decompress(files("lookaheadkv_kernels.data").joinpath("kjv_eval.txt.gz").read_bytes()).decode()
    verses = verses.splitlines()
    facts = [("The code is 4821.", 2), ("Anna lives in Oslo.", 4), ("The key is under the red mat.", 5)]
    prompts = []
    for i, (fact, n) in enumerate(facts):
        filler = " ".join(verses[20 * i : 20 * i + n])
        prompts.append(f"{filler} {fact}\n\nWhat fact about a code, a person or a key is given above?")
    lengths = [encode_prompt(tokenizer, p, None, "cpu").shape[1] for p in prompts]
    assert lengths[0] < 128 < lengths[1] < lengths[2] < 250, lengths
    return prompts


@pytest.mark.slow
def test_smollm2_batch_equals_each_prompt_alone_for_every_policy(smollm2, short_prompts):
    model, tokenizer = smollm2
    max_new = 5
    # Within budget nothing is evicted, whatever the policy: one reference serves them all.
    whole = [generate(model, tokenizer, p, policy="full", max_new_tokens=max_new).token_ids for p in short_prompts]
    for name in POLICIES:
        options = {"num_draft": 8} if name == "speckv" else {}  # a shorter self-draft keeps the test quick
        batch = generate(model, tokenizer, short_prompts, policy=name, budget=10**6, max_new_tokens=max_new, **options)
        assert [r.token_ids for r in batch] == whole, name
        batch = generate(model, tokenizer, short_prompts, policy=name, budget=128, max_new_tokens=max_new, **options)
        alone = [
            generate(model, tokenizer, p, policy=name, budget=128, max_new_tokens=max_new, **options)
            for p in short_prompts
        ]
        assert [r.token_ids for r in batch] == [r.token_ids for r in alone], name
        assert [r.text for r in batch] == [r.text for r in alone]
