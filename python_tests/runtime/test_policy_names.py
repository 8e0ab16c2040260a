"""One set of policy names across the CLI, the API and the docs: the CLI runs every policy the
runtime knows under the runtime's name, `generate` takes the CLI's "full", and the kvpress peers are
named like the API's kvpress configuration ("<method>-kvpress"). And `load_model` is quiet unless
asked."""

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lookaheadkv_kernels.evaluation.kvpress_peers import PRESSES  # noqa: E402
from lookaheadkv_kernels.evaluation.policies import (  # noqa: E402
    ALL_POLICIES,
    CONTROLS,
    FULL,
    MODULE_CONTROLS,
    PEER_POLICIES,
)
from lookaheadkv_kernels.runtime import generate, load_model, make_policy  # noqa: E402
from lookaheadkv_kernels.runtime.policies import POLICIES, SnapKV  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 64


def tiny_llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.pad_token_id = 0
    return model


def test_the_cli_runs_the_runtime_policies_under_the_runtimes_names():
    runtime_names = [name for name in ALL_POLICIES if name not in (FULL, *CONTROLS, *MODULE_CONTROLS, *PEER_POLICIES)]
    assert set(runtime_names) == set(POLICIES)


def test_kvpress_names_are_method_then_kvpress_in_the_cli_and_the_api():
    assert all(name.endswith("-kvpress") for name in PRESSES)
    assert "snapkv-kvpress" in PRESSES  # the evaluation runs kvpress's SnapKVPress under the API's name
    policy = make_policy("snapkv-kvpress")
    reference = SnapKV.kvpress()
    assert isinstance(policy, SnapKV) and (policy.window, policy.options) == (reference.window, reference.options)
    assert not any(name.startswith("kvpress-") for name in ALL_POLICIES)


@pytest.mark.parametrize("document", ["README.md", "docs/runtime.md", "bench/results/README_results.md"])
def test_the_docs_use_the_same_names(document):
    text = (ROOT / document).read_text()
    assert "kvpress-snapkv" not in text and "kvpress-knorm" not in text


def test_generate_full_keeps_the_whole_prompt():
    model = tiny_llama()
    ids = torch.randint(3, VOCAB, (1, 40), generator=torch.Generator().manual_seed(1))
    result = generate(model, None, ids, policy="full", budget=8, max_new_tokens=6)
    expected = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert result.token_ids == expected[0, ids.shape[1] :].tolist()
    assert result.eviction.policy == FULL and result.eviction.kept == [ids.shape[1]] * 2
    with pytest.raises(ValueError, match='policy "full" takes no options'):
        generate(model, None, ids, policy="full", window=8)


def saved_checkpoint(directory: Path) -> Path:
    """A tiny Llama checkpoint with a word-level tokenizer, made offline."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    tiny_llama().save_pretrained(directory)
    vocab = {f"w{i}": i for i in range(VOCAB)}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="w1")), unk_token="w1"
    )
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def progress_bars_on():
    """transformers' progress bars on (as in a fresh process; the commands turn them off), then as they were."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    yield
    if not was_on:
        hf_logging.disable_progress_bar()


def test_load_model_is_quiet_unless_verbose(tmp_path, capfd, progress_bars_on):
    from transformers.utils import logging as hf_logging

    checkpoint = saved_checkpoint(tmp_path)
    capfd.readouterr()
    load_model(checkpoint)
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # transformers' own settings are left as they were
    load_model(checkpoint, verbose=True)
    assert "Loading weights" in capfd.readouterr().err
