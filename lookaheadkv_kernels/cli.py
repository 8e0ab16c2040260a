"""`lookaheadkv` command line: one subcommand per tool, each a module with its own main(argv).

Errors are one line on stderr and a non-zero exit: 2 for a usage error (an unknown command, a bad
option), 1 for a failure while running (a model that does not load), 130 on Ctrl-C. Output piped
into a reader that stops early (`lookaheadkv --help | head -2`) ends quietly.
"""

from __future__ import annotations

import difflib
import importlib
import os
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
    "bench-vllm": (
        "lookaheadkv_kernels.integrations.vllm.bench",
        "vLLM at a fixed KV cache: concurrency, throughput and TTFT with eviction against without",
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


def unknown_command(name: str) -> str:
    close = difflib.get_close_matches(name, COMMANDS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"lookaheadkv: error: unknown command {name!r}{hint} (commands: {', '.join(COMMANDS)})"


def run(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] not in COMMANDS:
        print(unknown_command(argv[0]), file=sys.stderr)
        return 2
    module, _ = COMMANDS[argv[0]]
    return importlib.import_module(module).main(argv[1:]) or 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        try:
            status = run(argv)
        finally:
            sys.stdout.flush()  # here, so a closed pipe is seen inside the handler below, not at exit
    except BrokenPipeError:
        # The reader is gone; point stdout at /dev/null so the interpreter's final flush stays silent.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("lookaheadkv: interrupted", file=sys.stderr)
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
