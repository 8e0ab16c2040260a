"""`lookaheadkv` command line: one subcommand per tool, each a module with its own main(argv)."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": (
        "lookaheadkv_kernels.evaluation.demo",
        "answer one long-document question under several policies, side by side",
    ),
    "eval": (
        "lookaheadkv_kernels.evaluation.harness",
        "RULER-style long-context suite: every policy and budget, tables and plots",
    ),
    "bench-evict": (
        "lookaheadkv_kernels.evaluation.bench_evict",
        "time to first token and eviction overhead per policy",
    ),
    "bench": ("lookaheadkv_kernels.bench", "benchmark every op backend against the eager PyTorch composite"),
    "train": (
        "lookaheadkv_kernels.training.cli",
        "train a lookahead module: prompts, teacher answers, targets, training",
    ),
}


def usage():
    lines = ["usage: lookaheadkv <command> [options]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`lookaheadkv <command> --help` describes a command's options."]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        print(usage(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module, _ = COMMANDS[argv[0]]
    return importlib.import_module(module).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
