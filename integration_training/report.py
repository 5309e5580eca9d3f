"""The end of a run: the baseline → after SFT → after RL table, `report.md`, and `plots/*.png`.

Reads only what the stages wrote (`metrics.jsonl`; the evaluation stage's `eval/*.json` aggregates and
`eval/*.jsonl` per-problem scores) and recomputes no score: each cell is the evaluation's own number, so the
report, the terminal table and metrics.jsonl agree. The one statistic computed here compares two evaluations: the
paired test (`stats.paired_p_value`) on the per-problem sampled pass@1 the evaluation recorded. A report can be
rebuilt from any run directory: `python -m integration_training.report results/00_offline_cpu`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from integration_training.metrics import read_metrics
from integration_training.stats import INTERVAL_NOTE, Interval, format_p, paired_p_value

PAIRED_SCORE = "pass@1_strict"  # the per-problem score the paired test compares (what RL optimises)
COLUMNS = ("pass@1_strict", "pass@1_lenient", "greedy_strict", "greedy_lenient")


@dataclass(frozen=True)
class Evaluation:
    """One evaluated model as the evaluation stage wrote it: its aggregates and its per-problem scores."""

    label: str
    path: Path  # the per-problem records (eval/{stage}_step_N.jsonl); the aggregates sit next to it (.json)
    k: int
    num_problems: int
    metrics: dict[str, Interval]
    paired_scores: list[float]  # per problem, in problem order: the evaluation's PAIRED_SCORE
    keys: list[str]  # problem identity (prompt text), to check every row compares the same problems


def load_evaluation(path: Path, label: str) -> Evaluation:
    summary_path = path.with_suffix(".json")
    assert summary_path.is_file(), f"{summary_path} is missing: {path} was not written by the evaluation stage"
    summary = json.loads(summary_path.read_text())
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert rows, f"{path} holds no problems"
    assert all("scores" in r for r in rows), f"{path}: records without per-problem scores (an older run?)"
    assert len(rows) == summary["num_problems"], f"{path} and {summary_path} disagree on the problem count"
    return Evaluation(
        label=label,
        path=path,
        k=int(summary["k"]),
        num_problems=int(summary["num_problems"]),
        metrics={name: Interval(**interval) for name, interval in summary["metrics"].items()},
        paired_scores=[float(r["scores"][PAIRED_SCORE]) for r in rows],
        keys=[json.dumps(r["prompt"]) for r in rows],
    )


def eval_files(run_dir: Path, stage: str) -> list[tuple[int, Path]]:
    """(step, path) of a stage's evaluation records, ordered by step number."""
    found = []
    for path in (run_dir / "eval").glob(f"{stage}_step_*.jsonl"):
        found.append((int(path.stem.rsplit("_", 1)[1]), path))
    return sorted(found)


def stage_evaluations(run_dir: Path) -> list[Evaluation]:
    """The evaluated models in order: baseline, after SFT, after RL (whichever the run evaluated).

    The baseline is the model the run started from (`model.name`, or `output.source_checkpoint` in mode "rl");
    after RL is RL's latest evaluation (its final step: a stopped run writes no report).
    """
    chosen = [(stage, label, eval_files(run_dir, stage)) for stage, label in
              (("baseline", "baseline"), ("sft", "after SFT"), ("rl", "after RL"))]
    evaluations = [load_evaluation(files[-1][1], label) for _, label, files in chosen if files]
    for e in evaluations[1:]:
        assert e.keys == evaluations[0].keys, f"{e.path} evaluates other problems than {evaluations[0].path}"
    return evaluations


def _cell(interval: Interval) -> str:
    return f"{interval.value:.3f} [{interval.low:.2f}, {interval.high:.2f}]"


def comparison_rows(evaluations: list[Evaluation]) -> list[dict]:
    rows = []
    for index, e in enumerate(evaluations):
        previous = evaluations[index - 1] if index else None
        row = {"model": e.label, "problems": e.num_problems, "k": e.k}
        for name in COLUMNS:
            row[name] = e.metrics[name].value
            row[f"{name}_cell"] = _cell(e.metrics[name])
        row["p_vs_previous"] = paired_p_value(previous.paired_scores, e.paired_scores) if previous else None
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    ks = sorted({r["k"] for r in rows})
    samples = f"{ks[0]} sample{'' if ks[0] == 1 else 's'}/problem" if len(ks) == 1 else "samples"
    header = (
        f"| model | problems | sampled pass@1 strict ({samples}) | sampled pass@1 lenient | greedy strict | "
        "greedy lenient | p (paired, vs previous row) |"
    )
    lines = [header, "|---|---|---|---|---|---|---|"]
    for r in rows:
        p = "—" if r["p_vs_previous"] is None else format_p(r["p_vs_previous"])
        cells = " | ".join(r[f"{name}_cell"] for name in COLUMNS)
        lines.append(f"| {r['model']} | {r['problems']} | {cells} | {p} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- plots


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [float(p[1]) for p in points]


def _plot(path: Path, title: str, ylabel: str, curves: list[tuple[str, list[int], list[float]]]) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [c for c in curves if c[1]]
    if not curves:
        return None
    figure, axis = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    for label, xs, ys in curves:
        axis.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
    axis.set_title(title)
    axis.set_xlabel("step")
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.stem + ".tmp.png")
    figure.savefig(temporary)
    plt.close(figure)
    temporary.replace(path)
    return path


def held_out_rows(run_dir: Path) -> list[dict]:
    """The held-out scores along RL, as metrics rows with RL's step: RL's start (the after-SFT evaluation, or the
    baseline in mode "rl") at step 0, RL's own evaluations, and the after-RL one."""
    rl = read_metrics(run_dir, "rl")
    if not rl:
        return []
    evaluations = read_metrics(run_dir, "eval")
    start = [r for r in evaluations if r.get("evaluated") == "sft"] or [
        r for r in evaluations if r.get("evaluated") == "baseline"]
    rows = [{**start[-1], "step": 0}] if start else []
    rows += [r for r in rl if any(k.startswith("eval/") for k in r)]
    rows += [r for r in evaluations if r.get("evaluated") == "rl"]
    return sorted(rows, key=lambda r: r["step"])


def write_plots(run_dir: Path) -> list[Path]:
    plots = run_dir / "plots"
    sft = read_metrics(run_dir, "sft")
    rl = read_metrics(run_dir, "rl")
    held_out = held_out_rows(run_dir)
    pass_keys = sorted({k for r in held_out for k in r
                        if k.startswith("eval/pass@") and not k.endswith(("_low", "_high"))})
    made = [
        _plot(plots / "sft_loss.png", "SFT loss", "loss", [("train loss", *_series(sft, "loss")),
                                                          ("val loss", *_series(sft, "val_loss"))]),
        _plot(plots / "rl_reward.png", "RL mean reward (sampled, training prompts)", "reward",
              [("mean reward", *_series(rl, "reward"))]),
        _plot(plots / "rl_pass_at_k.png", "held-out pass@k during RL", "score",
              [(k.removeprefix("eval/"), *_series(held_out, k)) for k in pass_keys]),
        _plot(plots / "rl_response_length.png", "RL response length", "tokens",
              [("mean completion tokens", *_series(rl, "response_tokens"))]),
    ]
    return [p for p in made if p is not None]


# ---------------------------------------------------------------------------------------------------- report


def _tools_line(run_dir: Path) -> str:
    """Whether the evaluations ran with tools (from the config snapshot; older runs had none)."""
    snapshot = run_dir / "config.json"
    if not snapshot.is_file():
        return "tools: unknown (no config.json)"
    tools = json.loads(snapshot.read_text()).get("data", {}).get("tools", [])
    return f"tools: {', '.join(tools)} (results of <<EXPR= forced by the engine)" if tools else "tools: off"


def build_report(run_dir: Path) -> tuple[str, str]:
    """(table text for the terminal, report.md text). Writes the plots as a side effect."""
    evaluations = stage_evaluations(run_dir)
    table = format_table(comparison_rows(evaluations)) if evaluations else "(no evaluations in this run)"
    table = f"{table}\n{_tools_line(run_dir)}"
    plots = write_plots(run_dir)
    sft, rl = read_metrics(run_dir, "sft"), read_metrics(run_dir, "rl")
    lines = [
        f"# Run report: {run_dir.name}",
        "",
        "## Held-out evaluation",
        "",
        "Sampled pass@1 is estimated from several samples per problem at the evaluation temperature"
        " (`evaluation.sampling`); greedy is one argmax completion. Strict parses `#### N`, lenient takes the last"
        f" number. {INTERVAL_NOTE} p: one-sided paired sign-flip permutation test of the per-problem sampled"
        " pass@1 against the previous row. Every number is the evaluation's own, as it wrote it (eval/*.json;"
        " metrics.jsonl holds the same values).",
        "",
        table,
        "",
        "## Training",
        "",
        f"- SFT: {len([r for r in sft if 'loss' in r])} logged steps"
        + (f", final loss {sft[-1].get('loss', float('nan')):.4f}" if sft and "loss" in sft[-1] else ""),
        f"- RL: {len([r for r in rl if 'reward' in r])} logged steps",
        "",
        "## Wall time",
        "",
        *_timing_lines(run_dir),
        "",
        "## Plots",
        "",
    ]
    lines += [f"![{p.stem}](plots/{p.name})" for p in plots]
    return table, "\n".join(lines) + "\n"


def _timing_lines(run_dir: Path) -> list[str]:
    path = run_dir / "timings.jsonl"
    if not path.is_file():
        return ["(not recorded)"]
    phases = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = [f"- {p['phase']}: {p['seconds']:.0f} s" for p in phases]
    return lines + [f"- total: {sum(p['seconds'] for p in phases):.0f} s"] + _predicted_lines(run_dir, phases)


def _predicted_lines(run_dir: Path, phases: list[dict]) -> list[str]:
    """Predicted (the probe's estimate.json, written by `deploy.py CONFIG --probe`) next to measured, per phase."""
    path = run_dir / "estimate.json"
    if not path.is_file():
        return []
    predicted = json.loads(path.read_text())["phases"]
    lines = ["", "| phase | predicted (probe) | measured | measured / predicted |", "|---|---|---|---|"]
    for p in phases:
        guess = predicted.get(p["phase"])
        if guess is None:
            continue
        ratio = f"{p['seconds'] / guess:.2f}" if guess > 0 else "—"
        lines.append(f"| {p['phase']} | {guess:.0f} s | {p['seconds']:.0f} s | {ratio} |")
    measured = sum(p["seconds"] for p in phases if p["phase"] in predicted)
    guessed = sum(predicted[p["phase"]] for p in phases if p["phase"] in predicted)
    lines.append(f"| total | {guessed:.0f} s | {measured:.0f} s | {measured / guessed if guessed else 0:.2f} |")
    return lines


def write_report(run_dir: Path) -> str:
    table, text = build_report(run_dir)
    target = run_dir / "report.md"
    temporary = target.with_suffix(".md.tmp")
    temporary.write_text(text)
    temporary.replace(target)
    return table


def finish_run(config, run_dir: Path) -> None:
    """Print the comparison table and write report.md + plots (rank 0 only; called by cli)."""
    table = write_report(Path(run_dir))
    wall = "\n".join("  " + line.removeprefix("- ") for line in _timing_lines(Path(run_dir)))
    print(f"\n== finished: {Path(run_dir)} ==\n{table}\n\nwall time per phase:\n{wall}\n\n"
          f"report: {Path(run_dir) / 'report.md'}\nfull log: {Path(run_dir) / 'train.log'}")


if __name__ == "__main__":
    print(write_report(Path(sys.argv[1])))
