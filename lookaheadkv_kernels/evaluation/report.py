"""Tables and plots of an evaluation's JSONL records: CSV, markdown, PNG.

Scores are means over tasks of per-task means over samples (every task weighs the same), in points
(0-100). A sample counts toward a (policy, budget) cell only where that cell has a record for it.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

from .policies import FULL

MAIN_BUDGET = 128
TARGET_MARGIN_OVER_SNAPKV = 10.0
TARGET_GAP_TO_FULL = 10.0


def _ordered(values, preferred):
    values = set(values)
    return [v for v in preferred if v in values] + sorted(values - set(preferred), key=str)


class Table:
    """Per-(policy, budget, length, task) statistics of a set of records."""

    def __init__(self, records):
        self.cells = defaultdict(list)
        for record in records:
            budget = FULL if record["policy"] == FULL else record["budget"]
            self.cells[(record["policy"], str(budget), record["length"], record["task"])].append(record)

    def task_mean(self, policy, budget, length, task):
        records = self.cells.get((policy, str(budget), length, task))
        return statistics.fmean(r["score"] for r in records) if records else None

    def mean(self, policy, budget, lengths, tasks):
        """Mean over the given lengths and tasks of per-task means; None if any cell is missing."""
        values = [self.task_mean(policy, budget, n, t) for n in lengths for t in tasks]
        return None if not values or any(v is None for v in values) else statistics.fmean(values)

    def evict_ms(self, policy, budget, length):
        records = [r for t in self.tasks() for r in self.cells.get((policy, str(budget), length, t), [])]
        return 1000 * statistics.median(r["evict_seconds"] for r in records) if records else None

    def kept_percent(self, policy, budget, length):
        records = [r for t in self.tasks() for r in self.cells.get((policy, str(budget), length, t), [])]
        return 100 * statistics.fmean(r["kept_bytes"] / r["full_bytes"] for r in records) if records else None

    def tasks(self):
        return sorted({key[3] for key in self.cells})


def _fmt(value, digits=1):
    return "—" if value is None else f"{value:.{digits}f}"


def _budget_of(policy, budget):
    return FULL if policy == FULL else budget


def write_csv(table: Table, path: Path, policies, budgets, lengths, tasks):
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["policy", "budget", "length", "task", "samples", "score", "evict_ms_median", "kept_percent"])
        for policy in policies:
            for budget in [FULL] if policy == FULL else budgets:
                for length in lengths:
                    for task in list(tasks) + ["mean"]:
                        if task == "mean":
                            value, samples = table.mean(policy, budget, [length], tasks), ""
                        else:
                            value = table.task_mean(policy, budget, length, task)
                            samples = len(table.cells.get((policy, str(budget), length, task), []))
                        writer.writerow(
                            [
                                policy,
                                budget,
                                length,
                                task,
                                samples,
                                _fmt(value, 2),
                                _fmt(table.evict_ms(policy, budget, length), 2),
                                _fmt(table.kept_percent(policy, budget, length), 2),
                            ]
                        )


def run_line(run: dict) -> str:
    """One run of a results file: its command, then what is known of where and how it ran."""
    facts = [
        f"{label}{run[key]}{unit}"
        for key, label, unit in (
            ("commit", "commit ", ""),
            ("date", "", ""),
            ("machine", "", ""),
            ("module", "module ", ""),
            ("seed", "seed ", ""),
            ("threads", "", " CPU threads"),
            ("seconds", "", " s"),
        )
        if run.get(key) is not None
    ]
    return f"`{run.get('command')}` — " + "; ".join(facts)


def markdown(table: Table, meta: dict, policies, budgets, lengths, tasks) -> str:
    main = MAIN_BUDGET if MAIN_BUDGET in budgets else budgets[0]
    lines = []
    runs = meta.get("runs", [meta] if meta else [])
    if runs:
        lines += ["Produced by these runs of the results file, in order (a later run adds only missing records):", ""]
        lines += [f"- {run_line(run)}" for run in runs]
        lines += [""]
    count = {n: len({r["uid"] for rs in table.cells.values() for r in rs if r["length"] == n}) for n in lengths}
    lines += [f"Samples per length: {', '.join(f'{n}: {count[n]}' for n in lengths)} ({len(tasks)} tasks).", ""]

    lines += [
        f"### Mean score at budget {main} (tokens kept per layer and KV head; the mean over layers where budgets vary by layer)",
        "",
    ]
    header = ["policy"] + [f"{n} tok" for n in lengths] + ["all"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for policy in policies:
        budget = _budget_of(policy, main)
        row = [table.mean(policy, budget, [n], tasks) for n in lengths] + [table.mean(policy, budget, lengths, tasks)]
        label = "full cache" if policy == FULL else policy
        lines.append("| " + " | ".join([label] + [_fmt(v) for v in row]) + " |")

    lines += ["", "### Mean score over all lengths, by budget", ""]
    header = ["policy"] + [str(b) for b in budgets]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for policy in policies:
        row = [table.mean(policy, _budget_of(policy, b), lengths, tasks) for b in budgets]
        lines.append("| " + " | ".join(["full cache" if policy == FULL else policy] + [_fmt(v) for v in row]) + " |")

    lines += ["", f"### Per-task score at budget {main}, mean over lengths", ""]
    header = ["policy"] + list(tasks)
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for policy in policies:
        budget = _budget_of(policy, main)
        row = [table.mean(policy, budget, lengths, [t]) for t in tasks]
        lines.append("| " + " | ".join(["full cache" if policy == FULL else policy] + [_fmt(v) for v in row]) + " |")

    if {"lookaheadkv", "snapkv"} <= set(policies):
        lines += [
            "",
            f"### Targets at budget {main}",
            "",
            f"LookaheadKV ≥ SnapKV + {TARGET_MARGIN_OVER_SNAPKV:.0f} and ≥ full cache − {TARGET_GAP_TO_FULL:.0f}, "
            "at every length.",
            "",
            "| length | LookaheadKV | SnapKV | full | LookaheadKV − SnapKV | full − LookaheadKV | met |",
            "|---|---|---|---|---|---|---|",
        ]
        for n in lengths:
            la, snap = table.mean("lookaheadkv", main, [n], tasks), table.mean("snapkv", main, [n], tasks)
            full = table.mean(FULL, FULL, [n], tasks) if FULL in policies else None
            if None in (la, snap, full):
                lines.append(f"| {n} | {_fmt(la)} | {_fmt(snap)} | {_fmt(full)} | — | — | — |")
                continue
            met = la - snap >= TARGET_MARGIN_OVER_SNAPKV and full - la <= TARGET_GAP_TO_FULL
            lines.append(
                f"| {n} | {la:.1f} | {snap:.1f} | {full:.1f} | {la - snap:+.1f} | {full - la:+.1f} | {'yes' if met else 'no'} |"
            )

    lines += ["", f"### Eviction time at budget {main} (median ms per prompt, prefill excluded) and KV kept", ""]
    header = ["policy"] + [f"{n} tok" for n in lengths] + [f"KV kept @{lengths[-1]}"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for policy in policies:
        if policy == FULL:
            continue
        row = [_fmt(table.evict_ms(policy, main, n)) for n in lengths]
        kept = table.kept_percent(policy, main, lengths[-1])
        lines.append("| " + " | ".join([policy] + row + [f"{_fmt(kept)}%"]) + " |")
    return "\n".join(lines) + "\n"


def plot(table: Table, path: Path, policies, budgets, lengths, tasks) -> bool:
    """Score vs budget, one line per policy, one panel per length plus the mean; False if not drawn
    (no matplotlib, or fewer than two token budgets)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    token_budgets = sorted(b for b in budgets if isinstance(b, int))
    if len(token_budgets) < 2:  # a score-vs-budget line needs two budgets
        return False
    panels = [([n], f"{n} tokens") for n in lengths] + [(list(lengths), "all lengths")]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), sharey=True, squeeze=False)
    colors = dict(zip([p for p in policies if p != FULL], plt.get_cmap("tab20").colors))
    for ax, (panel_lengths, title) in zip(axes[0], panels):
        for policy in policies:
            if policy == FULL:
                full = table.mean(FULL, FULL, panel_lengths, tasks)
                if full is not None:
                    ax.axhline(full, color="black", linestyle="--", linewidth=1, label="full cache")
                continue
            points = [(b, table.mean(policy, b, panel_lengths, tasks)) for b in token_budgets]
            points = [(b, v) for b, v in points if v is not None]
            if points:
                style = {
                    "linewidth": 1.2,
                    "color": colors[policy],
                    "linestyle": "--" if policy.endswith("-kvpress") else "-",
                }
                if policy == "lookaheadkv":
                    style.update(linewidth=2.8, color="tab:red")
                ax.plot(*zip(*points), marker="o", markersize=3, label=policy, **style)
        ax.set_xscale("log", base=2)
        ax.set_xticks(token_budgets, [str(b) for b in token_budgets])
        ax.set_title(title)
        ax.set_xlabel("KV budget (tokens)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean score")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def write_report(store, out: Path, name: str, *, budgets, policies, lengths, tasks, meta_name=None) -> list[Path]:
    """Write eval_<name>.csv, .md and _score_vs_budget.png under `out`; return the paths written.

    The run's command line is read from eval_<meta_name>.meta.json (default: `name`).
    """
    out.mkdir(parents=True, exist_ok=True)
    table = Table(store.records.values())
    meta_path = out / f"eval_{meta_name or name}.meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    csv_path, md_path, png_path = (
        out / f"eval_{name}.csv",
        out / f"eval_{name}.md",
        out / f"eval_{name}_score_vs_budget.png",
    )
    write_csv(table, csv_path, policies, budgets, lengths, tasks)
    md_path.write_text(markdown(table, meta, policies, budgets, lengths, tasks))
    written = [csv_path, md_path]
    if plot(table, png_path, policies, budgets, lengths, tasks):
        written.append(png_path)
    return written
