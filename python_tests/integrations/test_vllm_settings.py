"""The vLLM plugin's settings and policy rules, without an engine (vLLM itself is only needed for the
block-layout test): what a request resolves to, every error it can get, and the module checks."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from lookaheadkv_kernels.integrations.vllm.module import check_module, load_weights, read_config, shipped_modules_root
from lookaheadkv_kernels.integrations.vllm.policies import POLICIES, add_votes, resolve_budget, shares, shift_scores
from lookaheadkv_kernels.integrations.vllm.settings import (
    EngineSettings,
    RequestEviction,
    SettingsError,
    engine_settings,
    resolve_request,
)


def smollm2_config(**changes):
    """An HF-config stand-in with SmolLM2's architecture fields (what the shipped module was trained on)."""
    saved = read_config(shipped_modules_root() / "smollm2-135m-instruct")["architecture"]
    return SimpleNamespace(**{**saved, **changes})


def engine(**settings):
    return engine_settings(SimpleNamespace(additional_config={"lookaheadkv": settings}))


def test_an_engine_without_the_key_has_no_eviction_and_refuses_requests_that_ask_for_it():
    assert engine_settings(SimpleNamespace(additional_config={})) is None
    assert resolve_request(None, {"temperature_like": 1}, 500, smollm2_config()) is None
    with pytest.raises(SettingsError, match="started without LookaheadKV") as error:
        resolve_request(None, {"lookaheadkv_policy": "snapkv"}, 500, smollm2_config())
    assert error.value.parameter == "lookaheadkv_policy"


def test_engine_settings_are_checked_at_start():
    assert engine(policy="snapkv", budget=64) == EngineSettings("snapkv", 64)
    assert engine(policy="full") == EngineSettings("full")
    with pytest.raises(SettingsError, match="unknown keys"):
        engine(policy="snapkv", budget=64, window=3)
    with pytest.raises(SettingsError, match="unknown eviction policy 'h2o'"):
        engine(policy="h2o", budget=64)
    with pytest.raises(SettingsError, match='needs a "budget"'):
        engine(policy="snapkv")
    with pytest.raises(ValueError, match="ratio"):
        engine(policy="snapkv", budget=1.5)


def test_requests_resolve_engine_defaults_and_their_own_overrides():
    config = smollm2_config()
    settings = engine(policy="snapkv", budget=128)
    assert resolve_request(settings, None, 1000, config) == RequestEviction("snapkv", 128)
    assert resolve_request(settings, {"lookaheadkv_budget": 0.25}, 1000, config) == RequestEviction("snapkv", 250)
    assert resolve_request(settings, {"lookaheadkv_policy": "streamingllm"}, 1000, config).policy == "streamingllm"
    assert resolve_request(settings, {"lookaheadkv_policy": "full"}, 1000, config) is None
    assert resolve_request(settings, None, 128, config) is None  # the prompt fits the budget
    shipped = resolve_request(settings, {"lookaheadkv_policy": "lookaheadkv"}, 1000, config)
    assert shipped.module.endswith("smollm2-135m-instruct")
    assert RequestEviction.from_extra_args({"x": 1, **shipped.to_extra_args()}) == shipped
    assert RequestEviction.from_extra_args({"x": 1}) is None


@pytest.mark.parametrize(
    "extra_args, parameter, message",
    [
        ({"lookaheadkv_policy": "h2o"}, "lookaheadkv_policy", "unknown eviction policy 'h2o'"),
        ({"lookaheadkv_budget": 0}, "lookaheadkv_budget", "budget must be >= 1"),
        ({"lookaheadkv_budget": "many"}, "lookaheadkv_budget", "budget must be an int"),
        ({"lookaheadkv_budget": 35}, "lookaheadkv_budget", r"below the 36 entries .* \(4 sinks \+ a 32-token window\)"),
        ({"lookaheadkv_window": 8}, "lookaheadkv_window", "unknown eviction options"),
    ],
)
def test_bad_requests_name_their_parameter(extra_args, parameter, message):
    with pytest.raises(SettingsError, match=message) as error:
        resolve_request(engine(policy="snapkv", budget=128), extra_args, 1000, smollm2_config())
    assert error.value.parameter == parameter


def test_what_each_policy_always_keeps():
    assert POLICIES["snapkv"].always_kept(1000) == 36  # 4 sinks + the 32-token window
    assert POLICIES["snapkv"].always_kept(20) == 20  # the window is all but one key
    assert POLICIES["lookaheadkv"].always_kept(1000) == 4  # its window votes; the window itself is scored
    assert POLICIES["streamingllm"].always_kept(1000) == 4
    with pytest.raises(SettingsError, match=r"below the 4 entries .* \(4 sinks\)"):
        resolve_request(engine(policy="streamingllm", budget=3), None, 1000, smollm2_config())
    assert resolve_budget(0.001, 100) == 1


def test_a_module_for_another_model_is_refused_with_the_fields_that_differ(tmp_path):
    shipped = shipped_modules_root() / "smollm2-135m-instruct"
    with pytest.raises(SettingsError, match="no lookahead module shipped .* fits this model") as error:
        resolve_request(engine(budget=128), None, 1000, smollm2_config(hidden_size=640))
    assert error.value.parameter == "lookaheadkv_module"
    with pytest.raises(SettingsError, match=r"trained for another model.*'hidden_size': \(576, 640\)"):
        resolve_request(engine(budget=128, module=str(shipped)), None, 1000, smollm2_config(hidden_size=640))
    copy = tmp_path / "module"
    shutil.copytree(shipped, copy)
    assert check_module(copy, smollm2_config()) == copy.resolve()
    config = json.loads((copy / "lookahead_config.json").read_text())
    config["architecture"]["num_hidden_layers"] = 12
    (copy / "lookahead_config.json").write_text(json.dumps(config))
    with pytest.raises(SettingsError, match="num_hidden_layers") as error:
        resolve_request(engine(budget=128), {"lookaheadkv_module": str(copy)}, 1000, smollm2_config())
    assert error.value.parameter == "lookaheadkv_module"
    with pytest.raises(SettingsError, match="is not a lookahead module"):
        resolve_request(engine(budget=128), {"lookaheadkv_module": str(tmp_path)}, 1000, smollm2_config())


@pytest.mark.parametrize("tp", [1, 3])
def test_module_weights_are_sliced_to_the_rank_shard(tp):
    directory, config = shipped_modules_root() / "smollm2-135m-instruct", smollm2_config()
    full = load_weights(
        directory,
        config,
        {t: ("out", slice(None)) for t in ("q", "k", "v", "gate", "up")}
        | {t: ("in", slice(None)) for t in ("o", "down")},
    )
    rank = tp - 1
    q, kv, mlp = 9 * 64 // tp, 3 * 64 // tp, 1536 // tp
    shards = {"q": ("out", slice(rank * q, (rank + 1) * q)), "k": ("out", slice(rank * kv, (rank + 1) * kv))}
    shards |= {"v": shards["k"], "o": ("in", shards["q"][1])}
    shards |= {t: ("out", slice(rank * mlp, (rank + 1) * mlp)) for t in ("gate", "up")}
    shards["down"] = ("in", slice(rank * mlp, (rank + 1) * mlp))
    part = load_weights(directory, config, shards)
    assert part.scale == 4.0 and part.n_lookahead == 32
    torch.testing.assert_close(part.embeddings, full.embeddings, rtol=0, atol=0)
    a, b = part.lora[7]["q"]
    assert a.shape == (8, 576) and b.shape == (q, 8)
    torch.testing.assert_close(b, full.lora[7]["q"][1][shards["q"][1]], rtol=0, atol=0)
    a, b = part.lora[7]["down"]
    assert a.shape == (8, mlp) and b.shape == (576, 8)


def test_scores_combine_as_the_runtime_combines_them():
    rows = torch.tensor([[[5.0, 1.0, 2.0, 3.0, 4.0]]])
    assert shift_scores(rows, 2).tolist() == [[[5.0, 5.0, 5.0, 1.0, 2.0]]]
    assert shift_scores(rows, 9).tolist() == [[[5.0] * 5]]
    torch.testing.assert_close(shares(rows, 1), rows / 10)
    window = torch.tensor([[[2.0, 1.0, 1.0]]])
    torch.testing.assert_close(add_votes(rows, window, 0.5, 1), rows / 10 + torch.tensor([[[0.5, 0.25, 0.25, 0, 0]]]))


def test_the_block_layout_map_reads_and_writes_what_the_cpu_backend_stores():
    pytest.importorskip("vllm")
    from vllm import _custom_ops as ops

    from lookaheadkv_kernels.integrations.vllm.worker import BlockLayout

    isas = [("vec", torch.float32, 32), ("vec", torch.bfloat16, 128), ("vec16", torch.float32, 16)]
    if torch.cpu._is_amx_tile_supported():
        isas.append(("amx", torch.bfloat16, 32))
    for isa, dtype, block_size in isas:
        heads, head_dim = 3, 64
        attention = SimpleNamespace(isa=isa, _k_scale_float=1.0, _v_scale_float=1.0)
        cache = torch.zeros(5, heads, block_size, 2 * head_dim, dtype=dtype)
        layout = BlockLayout(attention, cache)
        length = 2 * block_size + 3
        keys, values = torch.randn(2, length, heads, head_dim).to(dtype)
        k_view, v_view = cache.view(5, heads, 2 * block_size, head_dim).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(keys, values, k_view, v_view, torch.arange(length) + block_size, isa)
        blocks = torch.tensor([1, 2, 3])
        k, v = layout.read(cache, blocks)
        assert torch.equal(k.transpose(0, 1).reshape(heads, -1, head_dim)[:, :length], keys.transpose(0, 1)), isa
        assert torch.equal(v.transpose(0, 1).reshape(heads, -1, head_dim)[:, :length], values.transpose(0, 1)), isa
        before = cache.clone()
        layout.write(cache, blocks, k, v)
        assert torch.equal(cache, before), isa
