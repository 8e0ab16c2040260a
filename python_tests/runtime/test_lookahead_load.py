"""LookaheadModule.load refuses a malformed module directory with a ValueError naming the file at fault."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from lookaheadkv_kernels.runtime import LookaheadModule  # noqa: E402
from lookaheadkv_kernels.runtime.lookahead import CONFIG_FILE, WEIGHTS_FILE  # noqa: E402


@pytest.fixture(scope="module")
def model():
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture
def saved(tmp_path, model):
    LookaheadModule(model, n_lookahead=4, rank=2).save(tmp_path)
    return tmp_path


def edit_config(directory, **changes):
    path = directory / CONFIG_FILE
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is KeyError:
            del config[key]
        else:
            config[key] = value
    path.write_text(json.dumps(config))
    return path


def test_a_saved_module_loads(saved, model):
    assert LookaheadModule.load(saved, model).config.n_lookahead == 4


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"n_lookahead": KeyError}, r"missing keys \['n_lookahead'\]"),
        ({"extra": 1}, r"unknown keys \['extra'\]"),
        ({"rank": "8"}, "rank must be an int >= 1, got '8'"),
        ({"rank": 0}, "rank must be an int >= 1, got 0"),
        ({"n_lookahead": True}, "n_lookahead must be an int >= 1, got True"),
        ({"n_lookahead": 4.0}, "n_lookahead must be an int >= 1, got 4.0"),
        ({"alpha": -1}, "alpha must be a positive number, got -1"),
        ({"alpha": None}, "alpha must be a positive number, got None"),
        ({"targets": "q"}, "targets must be a non-empty list"),
        ({"targets": []}, "targets must be a non-empty list"),
        ({"targets": ["q", "q"]}, "targets must be a non-empty list of distinct names"),
        ({"targets": ["w"]}, "targets must be a non-empty list"),
        ({"architecture": []}, "architecture must be an object"),
        ({"config_hash": 7}, "config_hash must be a string"),
        ({"format_version": 2}, "format_version 2, expected 1"),
        ({"format_version": KeyError}, "format_version None, expected 1"),
    ],
)
def test_a_malformed_config_is_named(saved, model, changes, message):
    path = edit_config(saved, **changes)
    with pytest.raises(ValueError, match=message) as info:
        LookaheadModule.load(saved, model)
    assert str(info.value).startswith(f"{path}: ")


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "null", '"module"'])
def test_a_config_that_is_not_a_json_object_is_named(saved, model, text):
    (saved / CONFIG_FILE).write_text(text)
    with pytest.raises(ValueError, match=f"^{saved / CONFIG_FILE}: "):
        LookaheadModule.load(saved, model)


def edit_weights(directory, change):
    path = directory / WEIGHTS_FILE
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)
    return path


@pytest.mark.parametrize(
    "change,message",
    [
        (
            lambda t: t.update(embeddings=torch.full_like(t["embeddings"], float("nan"))),
            "embeddings has 128 non-finite",
        ),
        (lambda t: t["lora.1.q_b"].__setitem__((0, 0), float("inf")), r"lora.1.q_b has 1 non-finite"),
        (lambda t: t.update(embeddings=t["embeddings"][:2]), r"embeddings has shape \(2, 32\), expected \(4, 32\)"),
        (lambda t: t.pop("lora.0.v_a"), r"missing \['lora.0.v_a'\]"),
        (lambda t: t.update(extra=torch.zeros(1)), r"unknown \['extra'\]"),
        (lambda t: t.update(embeddings=t["embeddings"].long()), "embeddings has dtype torch.int64"),
    ],
)
def test_bad_weights_are_named(saved, model, change, message):
    path = edit_weights(saved, change)
    with pytest.raises(ValueError, match=message) as info:
        LookaheadModule.load(saved, model)
    assert str(info.value).startswith(f"{path}: ")


def test_a_damaged_weights_file_is_named(saved, model):
    path = saved / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"^{path}: not a readable safetensors file"):
        LookaheadModule.load(saved, model)
