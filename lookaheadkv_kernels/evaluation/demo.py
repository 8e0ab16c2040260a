"""`lookaheadkv demo`: one long document, one question, the answers of several policies side by side.

Loads the embedded SmolLM2 and its shipped lookahead module, prefills the document + question once,
then for each policy evicts a copy of the cache to the budget and decodes a greedy answer. Prints the
full-cache answer next to each policy's, with the KV memory each keeps and its eviction time (the
scoring, drafting and compaction work beyond the shared prefill).

The built-in document is a sample of the evaluation suite (a haystack of New Testament verses with
facts about invented people planted in it), so its answer is known; `--prompt-file` and
`--question` ask anything else.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

import torch

from ..argtypes import existing_file, parse_option, positive_int
from .policies import FULL, PEER_POLICIES, build_policy, load_lookahead, parse_budgets, parse_policies
from .tasks import Sample, make_sample, prompt_ids, score

BUILT_IN = ("niah_multikey", 2048, 0)
CUSTOM_MAX_NEW_TOKENS = 48  # answer length for --prompt-file (the built-in sample has its own)


def _parser():
    parser = argparse.ArgumentParser(prog="lookaheadkv demo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--prompt-file", type=existing_file, default=None, help="a text file to ask about (default: built-in)"
    )
    parser.add_argument("--question", default=None, help="the question (required with --prompt-file)")
    parser.add_argument(
        "--budget",
        default="128",
        help="KV entries kept per layer and head (int; the mean over layers where a policy varies it by layer) or a ratio (decimal)",
    )
    parser.add_argument("--policies", default="lookaheadkv,snapkv,laq", help="policies to compare with the full cache")
    parser.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=None,
        help=f"answer length (default: the built-in sample's, {CUSTOM_MAX_NEW_TOKENS} with --prompt-file)",
    )
    parser.add_argument("--model", default="smollm2", help="'smollm2' (embedded) or a local HF checkpoint directory")
    parser.add_argument("--module", default=None, help="lookahead module directory (default: the shipped one)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
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


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.prompt_file is None and args.question:
        parser.error("--question needs --prompt-file (the built-in document comes with its own question)")
    if args.prompt_file is not None and not args.question:
        parser.error("--prompt-file needs --question")
    budget = parse_option(parser, "--budget", _one_budget, args.budget)
    policies = [p for p in parse_option(parser, "--policies", parse_policies, args.policies) if p != FULL]

    from transformers.utils import logging as hf_logging

    from ..runtime.models import load_model
    from .kvpress_peers import press_evict
    from .replay import capture_prefill, decode, evict

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("loading the model ...", file=sys.stderr, flush=True)
    model, tokenizer = load_model(args.model)
    module = None
    if "lookaheadkv" in policies:
        try:
            module, module_dir = load_lookahead(model, args.module)
            print(f"lookahead module: {module_dir}", file=sys.stderr)
        except FileNotFoundError as error:
            print(f"skipping lookaheadkv: {error}", file=sys.stderr)
            policies.remove("lookaheadkv")

    sample = _sample(args, tokenizer)
    max_new = args.max_new_tokens or sample.max_new_tokens
    ids = torch.tensor([prompt_ids(sample, tokenizer)])
    print(f"prefilling {ids.shape[1]} tokens ...", file=sys.stderr, flush=True)
    prefill = capture_prefill(model, ids)
    full_bytes = prefill.full_cache_bytes()

    rows = [(FULL, decode(model, prefill, prefill.full_cache(), max_new), full_bytes, None)]
    skipped = []
    for name in policies:
        print(f"evicting with {name} ...", file=sys.stderr, flush=True)
        try:
            if name in PEER_POLICIES:
                replay = press_evict(model, prefill, name, budget)
            else:
                replay = evict(model, prefill, build_policy(name, module), budget, max_new_tokens=max_new)
        except ValueError as error:  # e.g. a budget below the window a policy always keeps
            skipped.append(f"{name}: {error}")
            continue
        rows.append((name, decode(model, prefill, replay.cache, max_new), replay.kept_bytes, replay.seconds))

    source = f"built-in {sample.task} document" if args.prompt_file is None else str(args.prompt_file)
    print(
        f"\nDocument: {source}, {prefill.num_prompt} prompt tokens (prefill {prefill.seconds:.1f} s); budget {budget}"
    )
    print("Question:", sample.question)
    if sample.answers:
        print("Expected:", ", ".join(sample.answers))
    print()
    width = 56
    print(
        f"{'policy':<14} {'answer':<{width}} {'KV kept':>18} {'eviction':>10}" + ("  correct" if sample.answers else "")
    )
    for name, tokens, kept, seconds in rows:
        text = " ".join(tokenizer.decode(tokens[0].tolist(), skip_special_tokens=True).split())
        lines = textwrap.wrap(text, width) or [""]
        kept_text = f"{100 * kept / full_bytes:5.1f}% {kept / 2**20:6.2f} MiB"
        timing = "—" if seconds is None else f"{1000 * seconds:.0f} ms"
        verdict = f"  {score(text, sample.answers):.0%}" if sample.answers else ""
        label = "full cache" if name == FULL else name
        print(f"{label:<14} {lines[0]:<{width}} {kept_text:>18} {timing:>10}{verdict}")
        for line in lines[1:]:
            print(f"{'':<14} {line}")
    for line in skipped:
        print(f"not run: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
