"""Every `lookaheadkv` command checks its options before it loads a model or builds data: a bad value
is a one-line usage error naming the option (exit status 2), a model or module that fails to load is
one line too (exit status 1), never a traceback minutes into a run."""

import json
import re
import subprocess
import sys

import pytest
import torch

from lookaheadkv_kernels import argtypes, cli
from lookaheadkv_kernels.evaluation import demo
from lookaheadkv_kernels.evaluation.policies import ALL_POLICIES, FULL
from lookaheadkv_kernels.runtime import models
from lookaheadkv_kernels.training import cli as train_cli
from lookaheadkv_kernels.training import report as train_report

LOAD_MODEL = models.load_model
MISSING = "/nonexistent/lookaheadkv"

BAD_OPTIONS = [
    (["demo", "--budget", "0"], "--budget: budget '0'"),
    (["demo", "--budget", "1.5"], "--budget: budget '1.5'"),
    (["demo", "--budget", "abc"], "--budget: budget 'abc': expected an int >= 1 (tokens) or a ratio in (0, 1]"),
    (["demo", "--budget", "64,128"], "--budget: one budget"),
    (["demo", "--policies", "snapkv,h2o"], "--policies: unknown policies ['h2o']"),
    (["demo", "--prompt-file", "/nonexistent/doc.txt", "--question", "q"], "--prompt-file: no such file"),
    (["demo", "--prompt-file", __file__], "--prompt-file needs --question"),
    (["demo", "--question", "q"], "--question needs --prompt-file"),
    (["demo", "--threads", "0"], "--threads: must be >= 1"),
    (["demo", "--threads", "two"], "--threads: expected an integer, got 'two'"),
    (["demo", "--max-new-tokens", "0"], "--max-new-tokens: must be >= 1"),
    (["demo", "--model", MISSING], f"--model: no such directory: {MISSING} (expected 'smollm2' or a local HF"),
    (["demo", "--model", "/"], "--model: / is not an HF checkpoint directory (no config.json)"),
    (["demo", "--module", MISSING], f"--module: no such directory: {MISSING}"),
    (["demo", "--policies", "snapkv", "--module", "/"], "--module is the lookaheadkv policies'"),
    (["eval", "--lengths", "1024,100"], "--lengths: must be >= 256"),
    (["eval", "--tasks", "niah_single,nope"], "--tasks: unknown tasks ['nope']"),
    (["eval", "--budgets", "64,0"], "--budgets: budget '0'"),
    (["eval", "--budgets", "64,x"], "--budgets: budget 'x': expected an int"),
    (["eval", "--samples", "0"], "--samples: must be >= 1"),
    (["eval", "--first-sample", "-1"], "--first-sample: must be >= 0"),
    (["eval", "--model", MISSING], "--model: no such directory"),
    (["eval", "--module", MISSING], "--module: no such directory"),
    (["eval", "--report-only", "--out", "/nonexistent", "--name", "none"], "--report-only: no records"),
    (["bench-evict", "--budget", "0"], "--budget: must be >= 1"),
    (["bench-evict", "--lengths", "abc"], "--lengths: expected an integer"),
    (["bench-evict", "--repeats", "0"], "--repeats: must be >= 1"),
    (["bench-evict", "--policies", "snapkv,snapkv-kvpress"], "--policies: bench-evict times the runtime's policies"),
    (["bench-evict", "--device", "tpu"], "--device: not a torch device"),
    (["bench-evict", "--model", MISSING], "--model: no such directory"),
    (["bench-evict", "--module", MISSING], "--module: no such directory"),
    (["bench", "--repeats", "0"], "--repeats: must be >= 1"),
    (["bench", "--ops", "attention_scores,nope"], "--ops: unknown ops ['nope']"),
    (["bench", "--lengths", "1,x"], "--lengths: expected an integer"),
    (["bench", "--device", "tpu"], "--device: invalid choice: 'tpu'"),
    (["train", "--out", "/nonexistent", "--steps", "0"], "--steps: must be >= 1"),
    (["train", "--out", "/nonexistent", "--pool-kernel", "4"], "odd pool_kernel"),
    (["train", "--out", "/nonexistent", "--min-tokens", "900", "--max-tokens", "500"], "--min-tokens 900 exceeds"),
    (["train", "--out", "/nonexistent", "--model", MISSING], "--model: no such directory"),
    (["train"], "the following arguments are required: --out"),
]


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    for owner in (models, train_cli, train_report):
        monkeypatch.setattr(owner, "load_model", refuse)


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


@pytest.mark.parametrize("argv, message", BAD_OPTIONS, ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_bad_options_are_one_line_usage_errors_naming_the_option(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    line = one_line(capsys.readouterr().err)
    assert exit_.value.code == 2 and line.startswith(f"lookaheadkv {argv[0]}: error:") and message in line, line
    assert line.endswith(f"(`lookaheadkv {argv[0]} --help` lists the options)")


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


def test_an_unknown_command_is_named_with_the_closest_one(capsys):
    assert cli.main(["demoo"]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("lookaheadkv: error: unknown command 'demoo'; did you mean 'demo'?"), line
    assert cli.main(["frobnicate"]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"unknown command 'frobnicate' (commands: {', '.join(cli.COMMANDS)})" in line, line
    assert "demo" in cli.COMMANDS and "bench" in cli.COMMANDS


def test_no_command_prints_the_usage_and_fails_help_succeeds(capsys):
    assert cli.main([]) == 2
    assert "usage: lookaheadkv <command>" in capsys.readouterr().err
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in cli.COMMANDS)


def command_parser(command, monkeypatch):
    """The parser `lookaheadkv <command>` builds, caught as it parses."""

    class Caught(Exception):
        pass

    def catch(self, *args, **kwargs):
        raise Caught(self)

    monkeypatch.setattr(argtypes.CommandParser, "parse_args", catch)
    with pytest.raises(Caught) as caught:
        cli.main([command])
    return caught.value.args[0]


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_option_has_help_text(command, monkeypatch):
    parser = command_parser(command, monkeypatch)
    options = [action for action in parser._actions if action.option_strings]
    assert len(options) > 1
    missing = [action.option_strings[0] for action in options if not action.help]
    assert not missing, f"{command}: options without help: {missing}"


def test_demo_help_lists_the_policies_and_the_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["demo", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    assert all(name in text for name in ALL_POLICIES if name != FULL)
    assert f"(default: {demo.DEFAULT_BUDGET})" in text and f"(default: {demo.DEFAULT_POLICIES};" in text


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["eval", "--help"]])
def test_a_closed_pipe_ends_quietly(argv):
    """`lookaheadkv --help | head -1`: the reader closes the pipe before the command writes. (argparse
    itself drops a failed help write, so its exit status stays 0.)"""
    process = subprocess.Popen(
        [sys.executable, "-m", "lookaheadkv_kernels.cli", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    process.stdout.close()
    _, err = process.communicate(timeout=120)
    assert process.returncode in (0, 1) and err == b"", err.decode()


def stub_model_load(monkeypatch):
    """load_model returning placeholders: enough for the commands to reach their module load."""
    monkeypatch.setattr(models, "load_model", lambda *args, **kwargs: (object(), object()))


def test_a_directory_that_is_not_a_lookahead_module_is_one_line(tmp_path, monkeypatch, capsys):
    stub_model_load(monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["demo", "--policies", "lookaheadkv", "--module", str(tmp_path)])
    line = one_line(capsys.readouterr().err.splitlines()[-1])  # after the progress lines
    assert exit_.value.code == 1 and line.startswith(f"lookaheadkv demo: error: --module: {tmp_path}"), line


def test_a_checkpoint_that_does_not_load_is_one_line(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    monkeypatch.setattr(models, "load_model", LOAD_MODEL)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-family"}))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["demo", "--model", str(tmp_path)])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 1 and line.startswith("lookaheadkv demo: error: --model: "), line


def test_a_missing_embedded_model_package_names_its_install_command(monkeypatch, capsys):
    def not_installed(*args, **kwargs):
        raise FileNotFoundError(f"SmolLM2 is embedded through the PyPI package {models.SMOLLM2_PACKAGE!r}, ...")

    monkeypatch.setattr(models, "load_model", not_installed)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["demo"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 1 and line.startswith("lookaheadkv demo: error: --model: SmolLM2 is embedded"), line


def smollm2_or_skip():
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    try:
        models.smollm2_gguf_path()
    except FileNotFoundError as error:
        pytest.skip(str(error))


def run_demo(argv, monkeypatch, capsys):
    monkeypatch.setattr(models, "load_model", LOAD_MODEL)
    assert cli.main(["demo", "--threads", "1", "--max-new-tokens", "4", *argv]) == 0
    return capsys.readouterr()


@pytest.mark.slow
def test_demo_table_has_a_header_over_every_column_and_the_times(tmp_path, monkeypatch, capsys):
    smollm2_or_skip()
    document = tmp_path / "doc.txt"
    document.write_text(" ".join(f"Room {i} of the house has {i % 7} windows." for i in range(40)))
    question = "How many windows has room 12?"
    out = run_demo(
        ["--prompt-file", str(document), "--question", question, "--policies", "streamingllm,knorm", "--budget", "16"],
        monkeypatch,
        capsys,
    ).out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("policy"))
    rows = [line for line in lines if line.startswith(("full cache ", "streamingllm ", "knorm "))]
    assert len(rows) == 3
    # Every header ends where the values of its column end (numbers are right-aligned).
    for column, pattern in [("KV kept", r"\d+\.\d%"), ("KV MiB", r"\d+\.\d\d"), ("generation", r"\d+(?: ms| s)")]:
        end = header.index(column) + len(column)
        for row in rows:
            assert re.search(f" {pattern}$", row[:end]), (column, header, row)
    full, streaming = rows[0], rows[1]
    assert " 100.0% " in full and " 100.0% " not in streaming  # the full cache keeps all, budget 16 far less
    assert re.search(r"^Total \S+ s: model load .*, prefill .*, eviction .*, generation .*$", out, re.M), out
    assert "nothing was evicted" not in out


@pytest.mark.slow
def test_demo_says_when_the_prompt_fits_the_budget(tmp_path, monkeypatch, capsys):
    smollm2_or_skip()
    document = tmp_path / "doc.txt"
    document.write_text("The blue door's code is 4471.")
    argv = ["--prompt-file", str(document), "--question", "What is the blue door's code?", "--policies", "snapkv"]
    out = run_demo(argv, monkeypatch, capsys).out
    assert "Note: nothing was evicted: the prompt (" in out and "fits the budget (128)" in out, out
