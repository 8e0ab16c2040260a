"""Where a result came from: the command, the commit, the date and the machine, for the header of
every results file (bench/results/)."""

import datetime
import os
import platform
import subprocess
import sys

import torch


def provenance(results_file: str, command: str | None = None) -> str:
    """Markdown lines naming the command (default: this process's, its output redirected to
    `results_file`), the commit it ran at, today's date and the machine."""
    command = command or " ".join(["python", *sys.argv]) + f" > {results_file}"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
        commit += " (uncommitted changes)" if dirty.stdout.strip() else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {device}; torch {torch.__version__}"
    date = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    return f"Command: `{command}`  \nCommit: {commit} ({date}) · Machine: {machine}\n"
