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
from pathlib import Path

import torch

from .policies import FULL, PEER_POLICIES, build_policy, load_lookahead, parse_policies
from .tasks import Sample, make_sample, prompt_ids, score

BUILT_IN = ("niah_multikey", 2048, 0)


def _parser():
    parser = argparse.ArgumentParser(prog="lookaheadkv demo", description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-file", type=Path, default=None, help="a text file to ask about (default: built-in)")
    parser.add_argument("--question", default=None, help="the question (required with --prompt-file)")
    parser.add_argument("--budget", default="128", help="KV entries kept per layer and head (int; the mean over layers where a policy varies it by layer) or a ratio (decimal)")
    parser.add_argument("--policies", default="lookaheadkv,snapkv,laq", help="policies to compare with the full cache")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--model", default="smollm2", help="'smollm2' (embedded) or a local HF checkpoint directory")
    parser.add_argument("--module", default=None, help="lookahead module directory (default: the shipped one)")
    parser.add_argument("--threads", type=int, default=None)
    return parser


def _sample(args, tokenizer) -> Sample:
    if args.prompt_file is None:
        if args.question:
            raise SystemExit("--question needs --prompt-file (the built-in document comes with its own question)")
        return make_sample(*BUILT_IN, tokenizer)
    if not args.question:
        raise SystemExit("--prompt-file needs --question")
    document = args.prompt_file.read_text()
    return Sample("custom", 0, 0, document, args.question, "", (), args.max_new_tokens)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    budget = float(args.budget) if "." in args.budget else int(args.budget)
    policies = [p for p in parse_policies(args.policies) if p != FULL]

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
    max_new = sample.max_new_tokens if args.prompt_file is None else args.max_new_tokens
    ids = torch.tensor([prompt_ids(sample, tokenizer)])
    print(f"prefilling {ids.shape[1]} tokens ...", file=sys.stderr, flush=True)
    prefill = capture_prefill(model, ids)
    full_bytes = prefill.full_cache_bytes()

    rows = [(FULL, decode(model, prefill, prefill.full_cache(), max_new), full_bytes, None)]
    for name in policies:
        print(f"evicting with {name} ...", file=sys.stderr, flush=True)
        if name in PEER_POLICIES:
            replay = press_evict(model, prefill, name, budget)
        else:
            replay = evict(model, prefill, build_policy(name, module), budget, max_new_tokens=max_new)
        rows.append((name, decode(model, prefill, replay.cache, max_new), replay.kept_bytes, replay.seconds))

    source = f"built-in {sample.task} document" if args.prompt_file is None else str(args.prompt_file)
    print(f"\nDocument: {source}, {prefill.num_prompt} prompt tokens (prefill {prefill.seconds:.1f} s); budget {budget}")
    print("Question:", sample.question)
    if sample.answers:
        print("Expected:", ", ".join(sample.answers))
    print()
    width = 56
    print(f"{'policy':<14} {'answer':<{width}} {'KV kept':>18} {'eviction':>10}" + ("  correct" if sample.answers else ""))
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
