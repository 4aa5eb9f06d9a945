"""The answer of a search: search.json, search.md, and search.html with its two figures (the trials'
history beside the baseline's seed spread, and each setting's importance). search.py runs the study
and the confirmation and hands them in; the statistics are compare's (comparison.py).

The winner is the confirmed trial with the best mean over the paired seeds; it is called better than
the baseline only where compare's verdict says so (the paired t-test, Holm-corrected, p below 0.05).
"""

import html
import math
import shlex
from pathlib import Path
from string import Template

from companions.experiments import comparison
from companions.training import files

PAGE_FILE = Path(__file__).with_name("search_page.html")
SEARCH_JSON, SEARCH_MD, SEARCH_HTML = "search.json", "search.md", "search.html"
HISTORY_PNG, IMPORTANCE_PNG = "search_history.png", "search_importance.png"
ANSWER_FILES = (SEARCH_JSON, SEARCH_MD, SEARCH_HTML, HISTORY_PNG, IMPORTANCE_PNG)


# ----------------------------------------------------------------------------------------------
# What the study found
# ----------------------------------------------------------------------------------------------


def trial_entry(trial):
    """A trial as search.json keeps it; a pruned trial's accuracy is its last evaluated epoch's."""
    epochs = {str(step): value for step, value in sorted(trial.intermediate_values.items())}
    accuracy = trial.value if trial.value is not None else (list(epochs.values())[-1] if epochs else None)
    return {
        "number": trial.number,
        "state": "diverged" if trial.user_attrs.get("diverged") else trial.state.name.lower(),
        "spec": trial.user_attrs.get("spec"),
        "accuracy": accuracy,
        "epochs": epochs,
        "seconds": trial.user_attrs.get("seconds"),
    }


def importances(study):
    """Each setting's share of the accuracy's variance across the complete trials (Optuna's fANOVA);
    empty where there are too few trials to say."""
    from optuna.importance import get_param_importances
    from optuna.trial import TrialState

    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < 2:
        return {}
    try:
        found = get_param_importances(study)
    except (RuntimeError, ValueError, ZeroDivisionError):
        return {}
    return {name: float(value) for name, value in found.items() if math.isfinite(value)}


def winner_of(contenders, confirmation):
    """The confirmed variant with the best mean (with compare's entry), or else the best complete
    trial that differs from the baseline; None where no trial does."""
    if confirmation:
        confirmed = [entry for entry in confirmation["variants"] if entry["name"] != "baseline"]
        best = max(confirmed, key=lambda entry: entry["mean"])
        return {"spec": best["name"], "confirmed": best}
    return {"spec": contenders[0], "confirmed": None} if contenders else None


def answer_text(trials, winner, confirmation):
    """The answer in one sentence."""
    if not any(trial["state"] == "complete" for trial in trials):
        return "No trial finished: there is nothing to compare with the baseline."
    if winner is None:
        return "Every finished trial trained the baseline's own settings: no winner, nothing better than the baseline."
    trial = min(
        (trial for trial in trials if trial["spec"] == winner["spec"] and trial["state"] == "complete"),
        key=lambda trial: trial["number"],
    )
    if confirmation is None:
        return (
            f"The best trial, {trial['number']} ({winner['spec']}), reached {trial['accuracy']:.2f} % with seed 0 "
            f"only; it was not run again beside the baseline over seeds, so it may be a lucky seed."
        )
    entry, seeds = winner["confirmed"], len(confirmation["seeds"])
    baseline = next(entry for entry in confirmation["variants"] if entry["name"] == "baseline")
    low, high = entry.get("difference_ci95", [0.0, 0.0])
    return (
        f"The winner, trial {trial['number']} ({winner['spec']}): {entry['mean']:.2f} % over {seeds} paired seeds "
        f"against the baseline's {baseline['mean']:.2f} %, a difference of {entry.get('difference', 0.0):+.2f} "
        f"points (95 % interval {low:+.2f} to {high:+.2f}, p {entry.get('p_holm', 1.0):.3g} Holm-corrected): "
        f"{entry.get('verdict', 'not compared with one seed')}."
    )


def summarise(study, description, contenders, confirmation, command_for):
    """search.json's content. `contenders`: the best trials' specs that differ from the baseline,
    best first; `command_for(spec)`: the command line that trains a spec."""
    trials = [trial_entry(trial) for trial in study.get_trials(deepcopy=False) if not trial.user_attrs.get("surplus")]
    winner = winner_of(contenders, confirmation)
    if winner:
        winner["command"] = shlex.join(command_for(winner["spec"]))
    summary = {"command": "search", **description, "trials": trials, "importance": importances(study)}
    return summary | {
        "confirmation": confirmation,
        "winner": winner,
        "answer": answer_text(trials, winner, confirmation),
    }


# ----------------------------------------------------------------------------------------------
# search.json, search.md, and search.html with its figures
# ----------------------------------------------------------------------------------------------


def trial_rows(summary):
    header = ("trial", "settings", "state", "accuracy %", "epochs evaluated", "seconds")
    rows = [
        (
            str(trial["number"]),
            trial["spec"] or "",
            trial["state"],
            comparison.percent(trial["accuracy"]),
            str(len(trial["epochs"])),
            "" if trial["seconds"] is None else f"{trial['seconds']:.1f}",
        )
        for trial in sorted(summary["trials"], key=lambda trial: -(trial["accuracy"] or -1))
    ]
    return header, rows


def importance_rows(summary):
    return ("setting", "importance"), [(name, f"{value:.3f}") for name, value in summary["importance"].items()]


def markdown(summary):
    lines = [f"# A search of {len(summary['space'])} settings: {summary['sampler']}, {summary['n_trials']} trials", ""]
    lines += [f"Baseline: `{' '.join(summary['baseline']) or 'the defaults'}`", ""]
    lines += [f"Space: {', '.join(f'`{spec}`' for spec in summary['space'])}", "", summary["answer"], ""]
    if summary["winner"]:
        lines += ["Train the winner:", "", f"    {summary['winner']['command']}", ""]
    sections = [("Trials (seed 0, validation split)", trial_rows(summary))]
    if summary["importance"]:
        sections.append(("Each setting's importance (Optuna's fANOVA)", importance_rows(summary)))
    if summary["confirmation"]:
        sections.append(("The confirmation (compare's)", comparison.table_rows(summary["confirmation"])))
    for title, (header, rows) in sections:
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows] + [""]
    return "\n".join(lines)


def plot_history(summary, path):
    """Every trial's accuracy in the order it started, the best so far, and the baseline's seeds."""
    from matplotlib.ticker import MaxNLocator

    from companions.reports.grids import new_figure, save_figure

    figure = new_figure(9, 4)
    axis = figure.subplots()
    trials = [trial for trial in summary["trials"] if trial["accuracy"] is not None]
    for state, marker in (("complete", "o"), ("pruned", "x")):
        chosen = [trial for trial in trials if trial["state"] == state]
        if chosen:
            axis.plot([t["number"] for t in chosen], [t["accuracy"] for t in chosen], marker, label=state, alpha=0.7)
    complete = sorted((t for t in trials if t["state"] == "complete"), key=lambda trial: trial["number"])
    if complete:
        best = [max(t["accuracy"] for t in complete[: k + 1]) for k in range(len(complete))]
        axis.step([t["number"] for t in complete], best, where="post", color="black", label="best so far")
    if summary["confirmation"]:
        baseline = next(e for e in summary["confirmation"]["variants"] if e["name"] == "baseline")
        low, high = min(baseline["accuracies"]), max(baseline["accuracies"])
        axis.axhspan(low, high, color="tab:green", alpha=0.2, label="the baseline's seeds (lowest to highest)")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("trial")
    axis.set_ylabel("validation accuracy (%)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    save_figure(figure, path)


def plot_importance(summary, path):
    from companions.reports.grids import new_figure, save_figure

    names = list(summary["importance"])[::-1]
    figure = new_figure(7, 0.45 * len(names) + 1.3)
    axis = figure.subplots()
    axis.barh(names, [summary["importance"][name] for name in names], color="tab:blue")
    axis.set_xlabel("share of the accuracy's variance across the trials (Optuna's fANOVA)")
    axis.set_xlim(0, 1)
    figure.tight_layout()
    save_figure(figure, path)


def html_page(summary, out_dir):
    from companions.reports.report import embedded_figure, html_table

    history = "Each trial's validation accuracy (seed 0) in the order it started; the band is the baseline's spread"
    figures = embedded_figure(out_dir / HISTORY_PNG, history + " over the confirmation's seeds.")
    if summary["importance"]:
        importance = "How much of the accuracy's variance across the trials each setting explains."
        figures += embedded_figure(out_dir / IMPORTANCE_PNG, importance)
    confirmation = "<p>No confirmation ran.</p>"
    if summary["confirmation"]:
        confirmation = html_table(*comparison.table_rows(summary["confirmation"]))
    winner = summary["winner"]
    return Template(PAGE_FILE.read_text(encoding="utf-8")).substitute(
        title=html.escape(f"A search: {summary['sampler']}, {summary['n_trials']} trials"),
        baseline=html.escape(" ".join(summary["baseline"]) or "the defaults"),
        space=html.escape(" ".join(summary["space"])),
        answer=html.escape(summary["answer"]),
        command=html.escape(winner["command"]) if winner else "(none)",
        figures=figures,
        confirmation=confirmation,
        trials=html_table(*trial_rows(summary)),
    )


def write_answer(out_dir, summary):
    files.write_json(out_dir / SEARCH_JSON, summary)
    text = markdown(summary)
    files.write_atomically(out_dir / SEARCH_MD, lambda file: file.write(text.encode()))
    plot_history(summary, out_dir / HISTORY_PNG)
    if summary["importance"]:
        plot_importance(summary, out_dir / IMPORTANCE_PNG)
    page = html_page(summary, out_dir)
    files.write_atomically(out_dir / SEARCH_HTML, lambda file: file.write(page.encode()))
