"""`lookaheadkv demo`: one long document, one question, the answers of several policies side by side.

Loads the embedded SmolLM2 and its shipped lookahead module, prefills the document + question once,
then for each policy evicts a copy of the cache to the budget and decodes a greedy answer. Prints the
full-cache answer next to each policy's, with the KV memory each keeps, its eviction time (the
scoring, drafting and compaction work beyond the shared prefill) and its generation time, then the
total time.

The built-in document is a sample of the evaluation suite (a haystack of New Testament verses with
facts about invented people planted in it), so its answer is known; `--prompt-file` and
`--question` ask anything else.

Progress goes to stderr, one line per stage (loading, prefilling, each policy); on a terminal that
line is rewritten in place and counts the tokens generated. The table goes to stdout.
"""

from __future__ import annotations

import sys
import textwrap
import time

import torch

from ..argtypes import (
    CommandParser,
    existing_dir,
    existing_file,
    load_errors_reported,
    model_source,
    parse_option,
    positive_int,
)
from .policies import (
    ALL_POLICIES,
    FULL,
    MODULE_POLICIES,
    PEER_POLICIES,
    build_policy,
    load_lookahead,
    parse_budgets,
    parse_policies,
)
from .tasks import Sample, make_sample, prompt_ids, score

BUILT_IN = ("niah_multikey", 2048, 0)
CUSTOM_MAX_NEW_TOKENS = 48  # answer length for --prompt-file (the built-in sample has its own)
DEFAULT_POLICIES = "lookaheadkv,snapkv,laq"
DEFAULT_BUDGET = "128"
ANSWER_WIDTH = 56


def _parser():
    compared = ", ".join(name for name in ALL_POLICIES if name != FULL)
    parser = CommandParser(
        prog="lookaheadkv demo",
        description=__doc__.splitlines()[0].split(": ", 1)[1].capitalize(),
        epilog=f"policies: {compared} (names ending in -kvpress run kvpress's own presses and need kvpress 0.5.x). "
        "Progress goes to stderr; on a terminal it counts the tokens generated.",
    )
    parser.add_argument(
        "--prompt-file",
        type=existing_file,
        default=None,
        help="a text file to ask about (default: the built-in document, with its own question)",
    )
    parser.add_argument("--question", default=None, help="the question (required with --prompt-file)")
    parser.add_argument(
        "--budget",
        default=DEFAULT_BUDGET,
        help="KV entries kept per layer and head (an int; the mean over layers where a policy varies it by layer) "
        "or a ratio of the prompt in (0, 1] (a decimal) (default: %(default)s)",
    )
    parser.add_argument(
        "--policies",
        default=DEFAULT_POLICIES,
        help="comma-separated policies compared with the full cache (default: %(default)s; all of them are listed "
        "below)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=None,
        help=f"answer length in tokens (default: the built-in sample's, {CUSTOM_MAX_NEW_TOKENS} with --prompt-file)",
    )
    parser.add_argument(
        "--model",
        type=model_source,
        default="smollm2",
        help="'smollm2' (the embedded SmolLM2-135M-Instruct, the default) or a local HF checkpoint directory",
    )
    parser.add_argument(
        "--module",
        type=existing_dir,
        default=None,
        help="lookahead module directory for the lookaheadkv policy (default: the one shipped for the model)",
    )
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    return parser


def _one_budget(text: str) -> int | float:
    budgets = parse_budgets(text)
    if len(budgets) != 1:
        raise ValueError(f"one budget, got {text!r}")
    return budgets[0]


def _sample(args, tokenizer) -> Sample:
    if args.prompt_file is None:
        return make_sample(*BUILT_IN, tokenizer)
    document = args.prompt_file.read_text()
    return Sample("custom", 0, 0, document, args.question, "", (), args.max_new_tokens or CUSTOM_MAX_NEW_TOKENS)


class Progress:
    """What the demo is doing, on stderr: a line per stage, or on a terminal one line rewritten in place."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()

    def stage(self, text: str) -> None:
        if self.live:
            self.stream.write(f"\r\033[K{text}")
            self.stream.flush()
        else:
            print(text, file=self.stream, flush=True)

    def token_counter(self, label: str, total: int):
        """A transformers streamer counting generated tokens on the live line; None off a terminal."""
        return _TokenCounter(self, label, total) if self.live else None

    def close(self) -> None:
        if self.live:
            self.stream.write("\r\033[K")
            self.stream.flush()


class _TokenCounter:
    """generate's streamer protocol: the first put() is the prompt (and the first answer token), each later one a token."""

    def __init__(self, progress: Progress, label: str, total: int):
        self.progress, self.label, self.total = progress, label, total
        self.count, self.prompt_seen = 1, False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.count += value.numel()
        self.progress.stage(f"{self.label}: generating, {self.count}/{self.total} tokens")

    def end(self) -> None:
        pass


def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{1000 * value:.0f} ms" if value < 1 else f"{value:.1f} s"


def main(argv=None) -> int:
    started = time.perf_counter()
    parser = _parser()
    args = parser.parse_args(argv)
    if args.prompt_file is None and args.question:
        parser.error("--question needs --prompt-file (the built-in document comes with its own question)")
    if args.prompt_file is not None and not args.question:
        parser.error("--prompt-file needs --question")
    budget = parse_option(parser, "--budget", _one_budget, args.budget)
    policies = [p for p in parse_option(parser, "--policies", parse_policies, args.policies) if p != FULL]
    if args.module is not None and not any(p in MODULE_POLICIES for p in policies):
        parser.error("--module is the lookaheadkv policies', and --policies leaves them out")
    peers = [p for p in policies if p in PEER_POLICIES]
    if peers:
        from .kvpress_peers import kvpress_version

        try:
            kvpress_version()
        except ImportError as error:
            parser.error(f"argument --policies: {', '.join(peers)} need kvpress: {error}")

    from transformers.utils import logging as hf_logging

    from ..runtime.models import load_model
    from .kvpress_peers import press_evict
    from .replay import capture_prefill, decode, evict

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = Progress()
    progress.stage("loading the model ...")
    with load_errors_reported(parser, "--model"):
        model, tokenizer = load_model(args.model)
    module = None
    if any(p in MODULE_POLICIES for p in policies):
        with load_errors_reported(parser, "--module"):
            module, module_dir = load_lookahead(model, args.module)
    loaded = time.perf_counter()

    sample = _sample(args, tokenizer)
    max_new = args.max_new_tokens or sample.max_new_tokens
    ids = torch.tensor([prompt_ids(sample, tokenizer)])
    progress.stage(f"prefilling {ids.shape[1]} tokens ...")
    prefill = capture_prefill(model, ids)
    full_bytes = prefill.full_cache_bytes()

    def generate(label, cache):
        progress.stage(f"{label}: generating ...")
        start = time.perf_counter()
        tokens = decode(model, prefill, cache, max_new, streamer=progress.token_counter(label, max_new))
        return tokens, time.perf_counter() - start

    rows = [(FULL, *generate("full cache", prefill.full_cache()), full_bytes, None)]
    skipped = []
    for name in policies:
        progress.stage(f"{name}: evicting ...")
        try:
            if name in PEER_POLICIES:
                replay = press_evict(model, prefill, name, budget)
            else:
                replay = evict(model, prefill, build_policy(name, module, model), budget, max_new_tokens=max_new)
        except ValueError as error:  # e.g. a budget below the window a policy always keeps
            skipped.append(f"{name}: {error}")
            continue
        rows.append((name, *generate(name, replay.cache), replay.kept_bytes, replay.seconds))
    progress.close()

    source = f"built-in {sample.task} document" if args.prompt_file is None else str(args.prompt_file)
    print(f"Document: {source}, {prefill.num_prompt} prompt tokens; budget {budget} KV entries per layer and head")
    if module is not None:
        print(f"Lookahead module: {module_dir}")
    print("Question:", sample.question)
    if sample.answers:
        print("Expected:", ", ".join(sample.answers))
    print()
    labels = {name: "full cache" if name == FULL else name for name, *_ in rows}
    name_width = max(len("policy"), *map(len, labels.values()))
    correct = "  correct" if sample.answers else ""
    print(
        f"{'policy':<{name_width}}  {'answer':<{ANSWER_WIDTH}}  {'KV kept':>7}  {'KV MiB':>7}  {'eviction':>8}  "
        f"{'generation':>10}{correct}"
    )
    for name, tokens, gen_seconds, kept, evict_seconds in rows:
        text = " ".join(tokenizer.decode(tokens[0].tolist(), skip_special_tokens=True).split())
        lines = textwrap.wrap(text, ANSWER_WIDTH) or [""]
        verdict = f"  {score(text, sample.answers):>7.0%}" if sample.answers else ""
        print(
            f"{labels[name]:<{name_width}}  {lines[0]:<{ANSWER_WIDTH}}  {100 * kept / full_bytes:>6.1f}%  "
            f"{kept / 2**20:>7.2f}  {_seconds(evict_seconds):>8}  {_seconds(gen_seconds):>10}{verdict}"
        )
        for line in lines[1:]:
            print(f"{'':<{name_width}}  {line}")
    for line in skipped:
        print(f"not run: {line}")
    untouched = [name for name, _, _, kept, _ in rows[1:] if kept == full_bytes]
    if untouched and len(untouched) == len(rows) - 1:
        print(
            f"\nNote: nothing was evicted: the prompt ({prefill.num_prompt} tokens) fits the budget ({budget}), so "
            "every policy keeps the whole cache. A smaller --budget or a longer --prompt-file shows eviction at work."
        )
    elif untouched:
        print(f"\nNote: {', '.join(untouched)} evicted nothing: their budgets cover the whole prompt.")
    evicting = sum(row[4] or 0.0 for row in rows)
    generating = sum(row[2] for row in rows)
    print(
        f"\nTotal {_seconds(time.perf_counter() - started)}: model load {_seconds(loaded - started)}, "
        f"prefill {_seconds(prefill.seconds)}, eviction {_seconds(evicting)}, generation {_seconds(generating)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
