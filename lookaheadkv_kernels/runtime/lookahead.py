"""The LookaheadKV module (learned lookahead embeddings + lookahead-only LoRA) and its forward stream.

The lookahead rows sit at positions N..N+n-1 after an N-token prompt under the normal causal mask,
so they read the prompt but the prompt never reads them: the prompt's KV and logits are unchanged.
The stream runs one decoder layer at a time from that layer's prompt K/V, with the layer's own
weights plus LoRA (applied to the lookahead rows only, which is what running them separately means):
queries through `lookahead_qproj`, attention output and prompt-key scores through
`lookahead_attention`. Both ops have autograd, so the same code trains the module.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

from .. import lookahead_attention, lookahead_qproj
from ..ops.validation import check_int
from .models import LayerParts, architecture, config_hash, layer_parts, rms_eps
from .scoring import ScoreOptions, shift_scores

PLAIN_SCORES = ScoreOptions()  # GQA mean, mean over the queries, no pooling, no shift

ATTENTION_TARGETS = ("q", "k", "v", "o")
MLP_TARGETS = ("gate", "up", "down")
ALL_TARGETS = ATTENTION_TARGETS + MLP_TARGETS
CONFIG_FILE = "lookahead_config.json"
WEIGHTS_FILE = "lookahead.safetensors"
FORMAT_VERSION = 1


@dataclass
class LookaheadConfig:
    base_model: str
    config_hash: str
    architecture: dict
    n_lookahead: int = 32
    rank: int = 8
    alpha: float = 32.0
    targets: tuple[str, ...] = ALL_TARGETS
    format_version: int = FORMAT_VERSION

    @property
    def lora_scale(self) -> float:
        return self.alpha / self.rank


def target_linear(parts: LayerParts, target: str) -> nn.Linear:
    owner = parts.attn if target in ATTENTION_TARGETS else parts.mlp
    return getattr(owner, f"{target}_proj")


class LookaheadModule(nn.Module):
    """`n_lookahead` learned embeddings and rank-`rank` LoRA on `targets` of every layer of one base model.

    LoRA B starts at zero, so an untrained module's LoRA is a no-op; the embeddings start random with
    the spread of the base model's token embeddings.
    """

    def __init__(
        self,
        model,
        *,
        n_lookahead: int = 32,
        rank: int = 8,
        alpha: float = 32.0,
        targets: tuple[str, ...] = ALL_TARGETS,
        seed: int = 0,
    ):
        super().__init__()
        check_int("n_lookahead", n_lookahead, 1)
        check_int("rank", rank, 1)
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be a positive number, got {alpha!r}")
        unknown = set(targets) - set(ALL_TARGETS)
        if unknown or not targets:
            raise ValueError(f"targets must be a non-empty subset of {ALL_TARGETS}, got {tuple(targets)}")
        parts = layer_parts(model)
        self.config = LookaheadConfig(
            base_model=str(getattr(model.config, "_name_or_path", "") or model.config.model_type),
            config_hash=config_hash(model.config),
            architecture=architecture(model.config),
            n_lookahead=n_lookahead,
            rank=rank,
            alpha=float(alpha),
            targets=tuple(t for t in ALL_TARGETS if t in targets),
        )
        generator = torch.Generator().manual_seed(seed)
        token_std = float(model.get_input_embeddings().weight.detach().float().std())
        self.embeddings = nn.Parameter(
            torch.randn(n_lookahead, model.config.hidden_size, generator=generator) * token_std
        )
        self.lora = nn.ModuleList()
        for p in parts:
            layer = nn.ParameterDict()
            for target in self.config.targets:
                linear = target_linear(p, target)
                a = torch.empty(rank, linear.in_features)
                # PEFT's LoRA-A initialisation (kaiming-uniform, a=sqrt(5)), from our own generator.
                bound = 1.0 / math.sqrt(linear.in_features)
                a.uniform_(-bound, bound, generator=generator)
                layer[f"{target}_a"] = nn.Parameter(a)
                layer[f"{target}_b"] = nn.Parameter(torch.zeros(linear.out_features, rank))
            self.lora.append(layer)

    def lora_pair(self, layer_idx: int, target: str) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        params = self.lora[layer_idx]
        if f"{target}_a" not in params:
            return None, None
        return params[f"{target}_a"], params[f"{target}_b"]

    # ---- persistence ----------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write WEIGHTS_FILE (safetensors) and CONFIG_FILE (JSON) into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in self.state_dict().items()}
        save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "lookaheadkv"})
        (directory / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2, sort_keys=True, default=str))
        return directory

    @classmethod
    def shipped(cls, model) -> LookaheadModule:
        """The module shipped with this package for `model` (see `shipped_module_dir`), in eval mode."""
        return cls.load(shipped_module_dir(model), model).eval()

    @classmethod
    def load(cls, directory: str | Path, model) -> LookaheadModule:
        """Load a module saved by `save` for use with `model`; a different base model is a ValueError."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        if not config_path.is_file() or not weights_path.is_file():
            raise FileNotFoundError(
                f"{directory} is not a saved lookahead module (needs {CONFIG_FILE} and {WEIGHTS_FILE})"
            )
        saved = read_config(config_path)
        if saved["config_hash"] != config_hash(model.config):
            current = architecture(model.config)
            differing = {
                k: (saved["architecture"].get(k), current.get(k))
                for k in current
                if json.dumps(saved["architecture"].get(k), default=str) != json.dumps(current.get(k), default=str)
            }
            raise ValueError(
                f"lookahead module in {directory} was trained for base model {saved['base_model']!r} "
                f"(config hash {saved['config_hash']}), but the given model has config hash "
                f"{config_hash(model.config)}; differing fields (saved, given): {differing}"
            )
        module = cls(
            model,
            n_lookahead=saved["n_lookahead"],
            rank=saved["rank"],
            alpha=saved["alpha"],
            targets=tuple(saved["targets"]),
        )
        module.config.base_model = saved["base_model"]
        module.load_state_dict(read_weights(weights_path, module.state_dict()))
        return module


CONFIG_KEYS = {  # key: (types, what it must be)
    "format_version": (int, "an int"),
    "base_model": (str, "a string"),
    "config_hash": (str, "a string"),
    "architecture": (dict, "an object"),
    "n_lookahead": (int, "an int >= 1"),
    "rank": (int, "an int >= 1"),
    "alpha": ((int, float), "a positive number"),
    "targets": (list, f"a non-empty list of distinct names from {list(ALL_TARGETS)}"),
}


def read_config(path: Path) -> dict:
    """The saved LookaheadConfig in `path`, every key present, typed and in range; ValueError naming the file."""
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: must hold a JSON object, got {type(saved).__name__}")
    if saved.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {saved.get('format_version')!r}, expected {FORMAT_VERSION}")
    missing, unknown = sorted(set(CONFIG_KEYS) - set(saved)), sorted(set(saved) - set(CONFIG_KEYS))
    if missing or unknown:
        raise ValueError(f"{path}: missing keys {missing}, unknown keys {unknown}")
    for key, (types, what) in CONFIG_KEYS.items():
        value = saved[key]
        valid = isinstance(value, types) and not isinstance(value, bool)
        if valid and key in ("n_lookahead", "rank"):
            valid = value >= 1
        elif valid and key == "alpha":
            valid = math.isfinite(value) and value > 0
        elif valid and key == "targets":
            valid = 0 < len(value) == len(set(value)) and all(isinstance(t, str) and t in ALL_TARGETS for t in value)
        if not valid:
            raise ValueError(f"{path}: {key} must be {what}, got {value!r}")
    return saved


def read_weights(path: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors in `path`, checked against a module's state dict `expected`: the same names and shapes,
    floating and finite; ValueError naming the file."""
    try:
        tensors = load_file(path)
    except Exception as error:  # safetensors raises its own error types for a damaged file
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
    missing, unknown = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unknown:
        raise ValueError(
            f"{path}: its tensors do not match the module its {CONFIG_FILE} describes "
            f"(missing {missing[:4]}{' ...' if len(missing) > 4 else ''}, "
            f"unknown {unknown[:4]}{' ...' if len(unknown) > 4 else ''})"
        )
    for name, want in expected.items():
        t = tensors[name]
        if t.shape != want.shape:
            raise ValueError(f"{path}: {name} has shape {tuple(t.shape)}, expected {tuple(want.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{path}: {name} has dtype {t.dtype}, expected a floating dtype")
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise ValueError(f"{path}: {name} has {bad} non-finite values (NaN or inf) of {t.numel()}")
    return tensors


# ---- the lookahead stream --------------------------------------------------------------------


def lora_linear(x: torch.Tensor, linear: nn.Linear, a: torch.Tensor | None, b: torch.Tensor | None, scale: float):
    """linear(x) + scale·(x·Aᵀ)·Bᵀ, the LoRA term accumulated in float32."""
    out = linear(x)
    if a is None:
        return out
    return out + (scale * F.linear(F.linear(x.float(), a.float()), b.float())).to(out.dtype)


def project_queries(
    parts: LayerParts,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    lora: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
    lora_scale: float = 1.0,
) -> torch.Tensor:
    """Rotated queries [B, Hq, T, D] of normalised layer inputs x [B, T, hidden], via `lookahead_qproj`.

    cos/sin are the HF position embeddings of those rows, [B or 1, T, D] (same positions for every
    batch row). This is the one query path of the runtime: lookahead rows (with LoRA) and the
    observation-window / draft rows of the baselines (without).
    """
    batch, rows, hidden = x.shape
    q_proj, q_norm = parts.attn.q_proj, parts.q_norm
    q = lookahead_qproj(
        x.reshape(batch * rows, hidden),
        q_proj.weight,
        cos[0].repeat(batch, 1),
        sin[0].repeat(batch, 1),
        parts.num_heads,
        bias=q_proj.bias,
        lora_a=lora[0],
        lora_b=lora[1],
        lora_scale=lora_scale,
        norm_weight=None if q_norm is None else q_norm.weight,
        eps=1e-6 if q_norm is None else rms_eps(q_norm),
    )
    return q.view(batch, rows, parts.num_heads, parts.head_dim).transpose(1, 2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF RoPE of x [B, H, T, D] with cos/sin [B or 1, T, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def lookahead_layer(
    module: LookaheadModule,
    parts: LayerParts,
    layer_idx: int,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    prompt_keys: torch.Tensor,
    prompt_values: torch.Tensor,
    num_scored: int,
    options: ScoreOptions = PLAIN_SCORES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder layer for the lookahead rows: (their output hidden [B, n, hidden], prompt-key scores).

    hidden [B, n, hidden] is the rows' input to this layer; cos/sin [1, n, D] their position
    embeddings; prompt_keys/values [B, Hkv, N, D] the layer's prompt cache (rotated keys). Scores
    [B, Hkv, num_scored] float32 cover prompt keys 0..num_scored-1.
    """
    layer, attn, mlp = parts.layer, parts.attn, parts.mlp
    scale = module.config.lora_scale
    batch, rows, _ = hidden.shape

    x = layer.input_layernorm(hidden)
    q = project_queries(parts, x, cos, sin, module.lora_pair(layer_idx, "q"), scale)
    k = lora_linear(x, attn.k_proj, *module.lora_pair(layer_idx, "k"), scale).view(batch, rows, -1, parts.head_dim)
    if parts.k_norm is not None:
        k = parts.k_norm(k)
    k = apply_rope(k.transpose(1, 2), cos, sin)
    v = lora_linear(x, attn.v_proj, *module.lora_pair(layer_idx, "v"), scale).view(batch, rows, -1, parts.head_dim)
    keys = torch.cat([prompt_keys, k.to(prompt_keys.dtype)], dim=2)
    values = torch.cat([prompt_values, v.transpose(1, 2).to(prompt_values.dtype)], dim=2)

    out, scores = lookahead_attention(
        q,
        keys,
        values,
        num_scored=num_scored,
        scale=parts.scaling,
        gqa_reduce=options.gqa_reduce,
        pool_kernel=options.pool_kernel,
        pool_type=options.pool_type,
        query_reduce=options.query_reduce,
    )
    scores = shift_scores(scores, options.pool_shift)
    attended = out.transpose(1, 2).reshape(batch, rows, -1)
    hidden = hidden + lora_linear(attended, attn.o_proj, *module.lora_pair(layer_idx, "o"), scale)

    x = layer.post_attention_layernorm(hidden)
    gate = lora_linear(x, mlp.gate_proj, *module.lora_pair(layer_idx, "gate"), scale)
    up = lora_linear(x, mlp.up_proj, *module.lora_pair(layer_idx, "up"), scale)
    hidden = hidden + lora_linear(mlp.act_fn(gate) * up, mlp.down_proj, *module.lora_pair(layer_idx, "down"), scale)
    return hidden, scores


def lookahead_positions(model, num_prompt: int, n_lookahead: int, like: torch.Tensor):
    """HF (cos, sin) [1, n, D] of positions num_prompt..num_prompt+n-1, in like's dtype/device."""
    positions = torch.arange(num_prompt, num_prompt + n_lookahead, device=like.device)[None]
    return model.model.rotary_emb(like, positions)


def initial_hidden(module: LookaheadModule, batch: int, like: torch.Tensor) -> torch.Tensor:
    return module.embeddings.to(like.dtype).unsqueeze(0).expand(batch, -1, -1)


def lookahead_stream(
    model,
    module: LookaheadModule,
    prompt_kv,
    num_scored: int | None = None,
    options: ScoreOptions = PLAIN_SCORES,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run the lookahead rows through every layer from a full prompt cache.

    prompt_kv: per layer (keys, values) [B, Hkv, N, D], e.g. [(l.keys, l.values) for l in cache.layers]
    of a DynamicCache after the prompt's prefill.
    Returns the rows' last hidden states [B, n, hidden] (before the final norm) and the per-layer
    scores [B, Hkv, num_scored] (default: all N prompt keys). Differentiable in the module's
    parameters; the eviction runtime runs the same per-layer step interleaved with the prefill.
    """
    parts = layer_parts(model)
    first_keys = prompt_kv[0][0]
    batch, num_prompt = first_keys.shape[0], first_keys.shape[2]
    hidden = initial_hidden(module, batch, first_keys)
    cos, sin = lookahead_positions(model, num_prompt, module.config.n_lookahead, hidden)
    all_scores = []
    for idx, p in enumerate(parts):
        keys, values = prompt_kv[idx][0], prompt_kv[idx][1]
        hidden, scores = lookahead_layer(
            module, p, idx, hidden, cos, sin, keys, values, num_prompt if num_scored is None else num_scored, options
        )
        all_scores.append(scores)
    return hidden, all_scores


def shipped_modules_root() -> Path:
    return Path(str(resources.files("lookaheadkv_kernels").joinpath("data", "modules")))


def shipped_module_dir(model) -> Path:
    """The directory of the lookahead module shipped for `model`, matched by its architecture hash."""
    wanted = config_hash(model.config)
    root = shipped_modules_root()
    for config in sorted(root.glob(f"*/{CONFIG_FILE}")) if root.is_dir() else ():
        if json.loads(config.read_text()).get("config_hash") == wanted:
            return config.parent
    raise FileNotFoundError(
        f"no lookahead module for this model (config hash {wanted}) is shipped under {root}; "
        "train one (lookaheadkv train) and load it with LookaheadModule.load(directory, model)"
    )
