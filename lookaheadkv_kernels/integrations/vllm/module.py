"""Lookahead modules for vLLM: found, checked against the served model, loaded and sharded per rank.

A module is the directory `LookaheadModule.save` writes (lookahead_config.json + lookahead.safetensors).
It was trained for one base model: its config records that model's architecture fields, and a
module whose fields differ from the served model's HF config is refused. The shipped modules live
under `lookaheadkv_kernels/data/modules/`, one per base model, found by those fields.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

CONFIG_FILE = "lookahead_config.json"
WEIGHTS_FILE = "lookahead.safetensors"
FORMAT_VERSION = 1
ATTENTION_TARGETS = ("q", "k", "v", "o")
ALL_TARGETS = (*ATTENTION_TARGETS, "gate", "up", "down")


def shipped_modules_root() -> Path:
    return Path(str(resources.files("lookaheadkv_kernels").joinpath("data", "modules")))


def read_config(directory: Path) -> dict:
    """The module's saved config, with the keys loading needs typed; ValueError naming the file."""
    path = directory / CONFIG_FILE
    if not path.is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise ValueError(f"{directory} is not a lookahead module (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    checks = {
        "format_version": lambda v: v == FORMAT_VERSION,
        "architecture": lambda v: isinstance(v, dict) and v,
        "n_lookahead": lambda v: isinstance(v, int) and v >= 1,
        "rank": lambda v: isinstance(v, int) and v >= 1,
        "alpha": lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v > 0,
        "targets": lambda v: isinstance(v, list) and v and len(set(v)) == len(v) and set(v) <= set(ALL_TARGETS),
    }
    if not isinstance(config, dict):
        raise ValueError(f"{path}: must hold a JSON object")
    for key, valid in checks.items():
        if key not in config or isinstance(config[key], bool) or not valid(config[key]):
            raise ValueError(f"{path}: {key} is missing or invalid ({config.get(key)!r})")
    return config


def architecture_mismatch(config: dict, hf_config) -> dict:
    """The architecture fields the module was trained with that differ on the served model: {field: (module's, model's)}."""
    mismatch = {}
    for name, saved in config["architecture"].items():
        current = getattr(hf_config, name, None)
        if json.dumps(saved, sort_keys=True, default=str) != json.dumps(current, sort_keys=True, default=str):
            mismatch[name] = (saved, current)
    return mismatch


def check_module(directory, hf_config) -> Path:
    """`directory` as an absolute path once it holds a module trained for the model of `hf_config`."""
    directory = Path(directory).expanduser().resolve()
    config = read_config(directory)
    mismatch = architecture_mismatch(config, hf_config)
    if mismatch:
        raise ValueError(
            f"the lookahead module in {directory} was trained for another model "
            f"({config.get('base_model', 'unnamed')}); fields that differ (module, served model): {mismatch}"
        )
    return directory


def shipped_module(hf_config) -> Path:
    """The shipped module trained for the model of `hf_config`."""
    root = shipped_modules_root()
    for config_path in sorted(root.glob(f"*/{CONFIG_FILE}")):
        if not architecture_mismatch(read_config(config_path.parent), hf_config):
            return config_path.parent
    raise ValueError(
        f"no lookahead module shipped under {root} fits this model; train one (lookaheadkv train) and pass "
        "its directory as the lookaheadkv module"
    )


@dataclass
class LookaheadWeights:
    """A module's tensors as this rank uses them (float32): the embeddings, and per layer and target
    the LoRA pair (a [r, in], b [out, r]) sliced to the rank's shard of the layer's weights."""

    embeddings: torch.Tensor
    lora: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]
    scale: float  # alpha / rank

    @property
    def n_lookahead(self) -> int:
        return self.embeddings.shape[0]


def load_weights(directory, hf_config, shards: dict[str, tuple[str, slice]]) -> LookaheadWeights:
    """Load the module in `directory` for this rank.

    `shards` maps a target to the dimension its rank shard cuts ("in": LoRA A's columns, for row
    parallel layers; "out": LoRA B's rows, for column parallel ones) and the slice this rank holds.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    config = read_config(directory)
    try:
        tensors = load_file(directory / WEIGHTS_FILE)
    except Exception as error:  # safetensors raises its own error types for a damaged file
        raise ValueError(f"{directory / WEIGHTS_FILE}: not a readable safetensors file ({error})") from None
    hidden, layers = hf_config.hidden_size, hf_config.num_hidden_layers
    expected = {"embeddings": (config["n_lookahead"], hidden)}
    sizes = _target_sizes(hf_config)
    for layer in range(layers):
        for target in config["targets"]:
            fan_in, fan_out = sizes[target]
            expected[f"lora.{layer}.{target}_a"] = (config["rank"], fan_in)
            expected[f"lora.{layer}.{target}_b"] = (fan_out, config["rank"])
    if set(tensors) != set(expected):
        raise ValueError(f"{directory / WEIGHTS_FILE}: its tensors do not match {CONFIG_FILE}")
    for name, shape in expected.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != shape or not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise ValueError(f"{directory / WEIGHTS_FILE}: {name} must be finite floats of shape {shape}")
    lora = []
    for layer in range(layers):
        pairs = {}
        for target in config["targets"]:
            a, b = tensors[f"lora.{layer}.{target}_a"].float(), tensors[f"lora.{layer}.{target}_b"].float()
            dim, part = shards[target]
            pairs[target] = (a[:, part].contiguous(), b) if dim == "in" else (a, b[part].contiguous())
        lora.append(pairs)
    return LookaheadWeights(tensors["embeddings"].float(), lora, config["alpha"] / config["rank"])


def _target_sizes(hf_config) -> dict[str, tuple[int, int]]:
    """(in, out) features of each LoRA target's full (unsharded) weight."""
    hidden = hf_config.hidden_size
    head_dim = getattr(hf_config, "head_dim", None) or hidden // hf_config.num_attention_heads
    q, kv = hf_config.num_attention_heads * head_dim, hf_config.num_key_value_heads * head_dim
    inter = hf_config.intermediate_size
    return {
        "q": (hidden, q),
        "k": (hidden, kv),
        "v": (hidden, kv),
        "o": (q, hidden),
        "gate": (hidden, inter),
        "up": (hidden, inter),
        "down": (inter, hidden),
    }
