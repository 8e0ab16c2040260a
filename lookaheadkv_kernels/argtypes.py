"""argparse helpers shared by the `lookaheadkv` commands.

Every command checks its options before it loads a model or builds data: a bad value is a usage
error naming the option (`lookaheadkv eval: error: argument --budgets: ...`, exit status 2), not a
traceback minutes into a run; a model or module that fails to load is one line too (exit status 1).
A leaf module: it imports nothing from the package.
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps help text between words only, so hyphenated names (policy names) are never split."""

    def _split_lines(self, text, width):
        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False)

    def _fill_text(self, text, width, indent):
        text = self._whitespace_matcher.sub(" ", text).strip()
        return textwrap.fill(text, width, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False)


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (the error, and where to read the options), exit status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= minimum."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int >= {minimum}"  # what argparse calls the type in its messages
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def int_list(minimum: int) -> Callable[[str], list[int]]:
    """An argparse type: "1024,2048", comma-separated integers, each >= minimum, at least one."""
    item = int_at_least(minimum)

    def parse(text: str) -> list[int]:
        try:
            values = [item(part.strip()) for part in text.split(",") if part.strip()]
        except argparse.ArgumentTypeError as error:
            raise argparse.ArgumentTypeError(f"{error} (in {text!r})") from None
        if not values:
            raise argparse.ArgumentTypeError("expected comma-separated integers, got none")
        return values

    parse.__name__ = "integer list"
    return parse


def parse_names(text: str, choices, what: str) -> list[str]:
    """Names from "a,b": comma-separated, each one of `choices`, at least one; else a ValueError
    saying which `what` (e.g. "policies") are unknown."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in choices]
    if unknown or not names:
        raise ValueError(f"unknown {what} {unknown}; choose from {', '.join(choices)}")
    return names


def choice_list(choices, what: str) -> Callable[[str], list[str]]:
    """An argparse type: parse_names with these choices."""

    def parse(text: str) -> list[str]:
        try:
            return parse_names(text, tuple(choices), what)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = f"{what} list"
    return parse


def existing_file(text: str) -> Path:
    """An argparse type: the path of an existing file."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


def existing_dir(text: str) -> Path:
    """An argparse type: the path of an existing directory."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"no such directory: {text}")
    return path


def model_source(text: str) -> str:
    """An argparse type: "smollm2" (the embedded model) or a local HF checkpoint directory (with config.json)."""
    if text.lower() == "smollm2":
        return text
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(
            f"no such directory: {text} (expected 'smollm2' or a local HF checkpoint directory)"
        )
    if not (path / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{text} is not an HF checkpoint directory (no config.json)")
    return text


def torch_device(text: str) -> str:
    """An argparse type: a torch device string ("cpu", "cuda", "cuda:1") that exists on this machine."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no CUDA device is available")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text}: only cpu and cuda devices are supported")
    return text


def parse_option(parser: argparse.ArgumentParser, option: str, parse: Callable[[str], T], text: str) -> T:
    """parse(text), with its ValueError (or ArgumentTypeError) turned into the parser's usage error naming `option`.

    For options that stay strings in the namespace (their defaults are compared with what was given,
    e.g. `--quick` filling in only options left at their defaults) but must be checked up front."""
    try:
        return parse(text)
    except (ValueError, argparse.ArgumentTypeError) as error:
        parser.error(f"argument {option}: {error}")


@contextmanager
def load_errors_reported(parser: argparse.ArgumentParser, option: str) -> Iterator[None]:
    """Loading what `option` names (a model, a lookahead module): a missing file or a model or module
    that does not fit ends the command with one line naming the option, exit status 1.

    For failures the option's type cannot see before the load; anything else keeps its traceback."""
    try:
        yield
    except (OSError, ValueError) as error:
        message = " ".join(str(error).split())  # one line, whatever the loader's message looked like
        parser.exit(1, f"{parser.prog}: error: {option}: {message}\n")
