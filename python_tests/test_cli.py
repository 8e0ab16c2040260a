"""Every `lookaheadkv` command checks its options before it loads a model or builds data: a bad value
is argparse's usage error naming the option (exit status 2), never a traceback minutes into a run."""

import pytest
import torch

from lookaheadkv_kernels import cli
from lookaheadkv_kernels.runtime import models
from lookaheadkv_kernels.training import cli as train_cli
from lookaheadkv_kernels.training import report as train_report

BAD_OPTIONS = [
    (["demo", "--budget", "0"], "--budget: budget '0'"),
    (["demo", "--budget", "1.5"], "--budget: budget '1.5'"),
    (["demo", "--budget", "64,128"], "--budget: one budget"),
    (["demo", "--policies", "snapkv,h2o"], "--policies: unknown policies ['h2o']"),
    (["demo", "--prompt-file", "/nonexistent/doc.txt", "--question", "q"], "--prompt-file: no such file"),
    (["demo", "--prompt-file", __file__], "--prompt-file needs --question"),
    (["demo", "--question", "q"], "--question needs --prompt-file"),
    (["demo", "--threads", "0"], "--threads: must be >= 1"),
    (["demo", "--max-new-tokens", "0"], "--max-new-tokens: must be >= 1"),
    (["eval", "--lengths", "1024,100"], "--lengths: must be >= 256"),
    (["eval", "--tasks", "niah_single,nope"], "--tasks: unknown tasks ['nope']"),
    (["eval", "--budgets", "64,0"], "--budgets: budget '0'"),
    (["eval", "--samples", "0"], "--samples: must be >= 1"),
    (["eval", "--first-sample", "-1"], "--first-sample: must be >= 0"),
    (["eval", "--report-only", "--out", "/nonexistent", "--name", "none"], "--report-only: no records"),
    (["bench-evict", "--budget", "0"], "--budget: must be >= 1"),
    (["bench-evict", "--lengths", "abc"], "--lengths: expected an integer"),
    (["bench-evict", "--repeats", "0"], "--repeats: must be >= 1"),
    (["bench-evict", "--policies", "snapkv,kvpress-snapkv"], "--policies: bench-evict times the runtime's policies"),
    (["bench-evict", "--device", "tpu"], "--device: not a torch device"),
    (["bench", "--repeats", "0"], "--repeats: must be >= 1"),
    (["bench", "--ops", "attention_scores,nope"], "--ops: unknown ops ['nope']"),
    (["bench", "--lengths", "1,x"], "--lengths: expected an integer"),
    (["train", "--out", "/nonexistent", "--steps", "0"], "--steps: must be >= 1"),
    (["train", "--out", "/nonexistent", "--pool-kernel", "4"], "odd pool_kernel"),
    (["train", "--out", "/nonexistent", "--min-tokens", "900", "--max-tokens", "500"], "--min-tokens 900 exceeds"),
]


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    for owner in (models, train_cli, train_report):
        monkeypatch.setattr(owner, "load_model", refuse)


@pytest.mark.parametrize("argv, message", BAD_OPTIONS, ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_bad_options_are_usage_errors_naming_the_option(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"lookaheadkv {argv[0]}: error:" in err and message in err, err


def test_report_options_are_checked_too(capsys):
    with pytest.raises(SystemExit) as exit_:
        train_report.main(["--out", "/nonexistent/r.md", "--budgets", "0"])
    assert exit_.value.code == 2 and "--budgets: must be >= 1" in capsys.readouterr().err


def test_cuda_device_without_cuda_is_a_usage_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench-evict", "--device", "cuda"])
    assert exit_.value.code == 2 and "--device: cuda: no CUDA device is available" in capsys.readouterr().err
