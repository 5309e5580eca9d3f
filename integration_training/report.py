"""The end of a run: the baseline → after SFT → after RL table, `report.md`, and `plots/*.png`.

Reads only what the stages wrote (`metrics.jsonl`, `eval/*.jsonl`), so a report can be rebuilt from any run
directory: `python -m integration_training.report results/00_offline_cpu`.
"""

from __future__ import annotations

import json
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from integration_training.metrics import read_metrics

CORRECT = 0.5  # a sample counts as correct when its reward exceeds this (verifiers return 0/1)
PERMUTATIONS = 20_000


@dataclass(frozen=True)
class Checkpoint:
    """One evaluated model: a label and its per-problem scores on the shared held-out problems."""

    label: str
    path: Path
    sampled_strict: list[float]  # per problem: fraction of samples correct (= unbiased pass@1)
    sampled_lenient: list[float]
    greedy_strict: list[float]
    greedy_lenient: list[float]
    keys: list[str]  # problem identity (prompt text), to check every row compares the same problems


def load_eval(path: Path, label: str) -> Checkpoint:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert rows, f"{path} holds no problems"

    def fraction(values: list[float]) -> float:
        return sum(v > CORRECT for v in values) / len(values)

    return Checkpoint(
        label=label,
        path=path,
        sampled_strict=[fraction(r["strict"]) for r in rows],
        sampled_lenient=[fraction(r["lenient"]) for r in rows],
        greedy_strict=[float(r["greedy_strict"] > CORRECT) for r in rows],
        greedy_lenient=[float(r["greedy_lenient"] > CORRECT) for r in rows],
        keys=[json.dumps(r["prompt"]) for r in rows],
    )


def eval_files(run_dir: Path, stage: str) -> list[tuple[int, Path]]:
    """(step, path) of a stage's evaluation files, ordered by step number."""
    found = []
    for path in (run_dir / "eval").glob(f"{stage}_step_*.jsonl"):
        found.append((int(path.stem.rsplit("_", 1)[1]), path))
    return sorted(found)


def stage_checkpoints(run_dir: Path) -> list[Checkpoint]:
    """The evaluated models in order: baseline, after SFT, after RL (whichever exist)."""
    checkpoints = []
    baseline = eval_files(run_dir, "baseline")
    sft_final = eval_files(run_dir, "sft")
    rl = eval_files(run_dir, "rl")
    if baseline:
        checkpoints.append(load_eval(baseline[-1][1], "baseline"))
    if sft_final:
        checkpoints.append(load_eval(sft_final[-1][1], "after SFT"))
    elif rl and rl[0][0] == 0:
        # RL's step-0 eval scores the model RL starts from: SFT's result, or the source checkpoint in mode "rl".
        checkpoints.append(load_eval(rl[0][1], "after SFT" if baseline else "RL start (source checkpoint)"))
    if rl and rl[-1][0] > 0:
        checkpoints.append(load_eval(rl[-1][1], "after RL"))
    for c in checkpoints[1:]:
        assert c.keys == checkpoints[0].keys, f"{c.path} evaluates other problems than {checkpoints[0].path}"
    return checkpoints


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def wilson_interval(values: list[float], z: float = 1.96) -> tuple[float, float]:
    """95% interval for a mean of per-problem scores in [0, 1] (Wilson, with n = problems)."""
    n, p = len(values), mean(values)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_p_value(before: list[float], after: list[float], seed: int = 0) -> float:
    """One-sided paired sign-flip permutation test that `after` beats `before` on the same problems."""
    assert len(before) == len(after) and before
    differences = [a - b for a, b in zip(after, before)]
    observed = sum(differences)
    if all(d == 0 for d in differences):
        return 1.0
    rng = random.Random(seed)
    at_least = 0
    for _ in range(PERMUTATIONS):
        flipped = sum(d if rng.random() < 0.5 else -d for d in differences)
        at_least += flipped >= observed - 1e-12
    return (at_least + 1) / (PERMUTATIONS + 1)


def format_p(p: float) -> str:
    """Four decimals; below 0.0001 (the test resolves ~1/PERMUTATIONS) "< 0.0001" rather than a bare 0.0000."""
    return "< 0.0001" if p < 1e-4 else f"{p:.4f}"


def _cell(values: list[float]) -> str:
    low, high = wilson_interval(values)
    return f"{mean(values):.3f} [{low:.2f}, {high:.2f}]"


def comparison_rows(checkpoints: list[Checkpoint]) -> list[dict]:
    rows = []
    for index, c in enumerate(checkpoints):
        previous = checkpoints[index - 1] if index else None
        rows.append(
            {
                "model": c.label,
                "problems": len(c.keys),
                "sampled_strict": mean(c.sampled_strict),
                "sampled_lenient": mean(c.sampled_lenient),
                "greedy_strict": mean(c.greedy_strict),
                "greedy_lenient": mean(c.greedy_lenient),
                "sampled_strict_cell": _cell(c.sampled_strict),
                "sampled_lenient_cell": _cell(c.sampled_lenient),
                "greedy_strict_cell": _cell(c.greedy_strict),
                "greedy_lenient_cell": _cell(c.greedy_lenient),
                "p_vs_previous": paired_p_value(previous.sampled_strict, c.sampled_strict) if previous else None,
            }
        )
    return rows


def format_table(rows: list[dict], k: int | None) -> str:
    samples = f"{k} samples/problem" if k else "samples"
    header = (
        f"| model | problems | sampled pass@1 strict ({samples}) | sampled pass@1 lenient | greedy strict | "
        "greedy lenient | p (paired, vs previous row) |"
    )
    lines = [header, "|---|---|---|---|---|---|---|"]
    for r in rows:
        p = "—" if r["p_vs_previous"] is None else format_p(r["p_vs_previous"])
        lines.append(
            f"| {r['model']} | {r['problems']} | {r['sampled_strict_cell']} | {r['sampled_lenient_cell']} | "
            f"{r['greedy_strict_cell']} | {r['greedy_lenient_cell']} | {p} |"
        )
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


def write_plots(run_dir: Path) -> list[Path]:
    plots = run_dir / "plots"
    sft = read_metrics(run_dir, "sft")
    rl = read_metrics(run_dir, "rl")
    pass_keys = sorted({k for r in rl for k in r if k.startswith("eval/pass@") and not k.endswith(("_low", "_high"))})
    made = [
        _plot(plots / "sft_loss.png", "SFT loss", "loss", [("train loss", *_series(sft, "loss")),
                                                          ("val loss", *_series(sft, "val_loss"))]),
        _plot(plots / "rl_reward.png", "RL mean reward (sampled, training prompts)", "reward",
              [("mean reward", *_series(rl, "reward"))]),
        _plot(plots / "rl_pass_at_k.png", "held-out pass@k during RL", "score",
              [(k.removeprefix("eval/"), *_series(rl, k)) for k in pass_keys]),
        _plot(plots / "rl_response_length.png", "RL response length", "tokens",
              [("mean completion tokens", *_series(rl, "response_tokens"))]),
    ]
    return [p for p in made if p is not None]


# ---------------------------------------------------------------------------------------------------- report


def _eval_k(run_dir: Path) -> int | None:
    snapshot = run_dir / "config.json"
    if not snapshot.is_file():
        return None
    return json.loads(snapshot.read_text()).get("evaluation", {}).get("num_samples")


def _tools_line(run_dir: Path) -> str:
    """Whether the evaluations ran with tools (from the config snapshot; older runs had none)."""
    snapshot = run_dir / "config.json"
    if not snapshot.is_file():
        return "tools: unknown (no config.json)"
    tools = json.loads(snapshot.read_text()).get("data", {}).get("tools", [])
    return f"tools: {', '.join(tools)} (results of <<EXPR= forced by the engine)" if tools else "tools: off"


def build_report(run_dir: Path) -> tuple[str, str]:
    """(table text for the terminal, report.md text). Writes the plots as a side effect."""
    checkpoints = stage_checkpoints(run_dir)
    k = _eval_k(run_dir)
    table = format_table(comparison_rows(checkpoints), k) if checkpoints else "(no evaluations in this run)"
    table = f"{table}\n{_tools_line(run_dir)}"
    plots = write_plots(run_dir)
    sft, rl = read_metrics(run_dir, "sft"), read_metrics(run_dir, "rl")
    lines = [
        f"# Run report: {run_dir.name}",
        "",
        "## Held-out evaluation",
        "",
        "Sampled pass@1 is estimated from evaluation.num_samples samples per problem at evaluation.sampling's temperature;"
        " greedy is one argmax completion. Strict parses `#### N`, lenient takes the last number. Brackets: 95%"
        " Wilson intervals over problems; p: one-sided paired permutation test against the previous row.",
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
