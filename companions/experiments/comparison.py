"""The answer of a comparison: the statistics over the paired seeds (scipy's), and compare.json,
compare.md, and compare.html with compare.png. compare.py runs the comparison and hands its results in.

For each variant: its seeds' mean, SD, median and 95 % interval, and the accuracy of their ensemble.
Against the baseline, seed by seed: the mean difference with its 95 % interval, the paired t-test's
p-value, Holm-corrected over the variants, the smallest difference these seeds would detect, and a
verdict: better or worse only where the corrected p-value is below SIGNIFICANCE.
"""

import html
import math
from pathlib import Path
from string import Template

import numpy as np
import torch

from companions.training import files

PAGE_FILE = Path(__file__).with_name("compare_page.html")
COMPARE_JSON, COMPARE_MD, COMPARE_HTML, COMPARE_PNG = "compare.json", "compare.md", "compare.html", "compare.png"
ANSWER_FILES = (COMPARE_JSON, COMPARE_MD, COMPARE_HTML, COMPARE_PNG)
SIGNIFICANCE = 0.05  # a Holm-corrected p-value below this is a difference; the intervals are 95 %
POWER = 0.8  # the smallest detectable difference is the one these seeds would find this often


# ----------------------------------------------------------------------------------------------
# The statistics: per variant, and each against the baseline, seed by seed
# ----------------------------------------------------------------------------------------------


def spread(accuracies):
    """Mean, SD, median and the 95 % confidence interval of the mean (Student's t) of some seeds."""
    from scipy import stats

    values = np.asarray(accuracies, dtype=np.float64)
    count, mean = len(values), float(values.mean())
    sd = float(values.std(ddof=1)) if count > 1 else None
    interval = (
        [float(bound) for bound in stats.t.interval(0.95, count - 1, loc=mean, scale=sd / math.sqrt(count))]
        if sd
        else [mean, mean]
    )
    return {"mean": mean, "sd": sd, "median": float(np.median(values)), "ci95": interval}


def paired(baseline, accuracies):
    """Against the baseline, seed by seed: the mean difference with its 95 % interval, the paired
    t-test's p-value and the smallest difference these seeds would detect with POWER."""
    from scipy import stats

    differences = np.asarray(accuracies, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    count, mean = len(differences), float(differences.mean())
    sd = float(differences.std(ddof=1))
    if sd == 0:  # the same difference on every seed: the t-test has no spread to weigh it by
        return {"difference": mean, "difference_ci95": [mean, mean], "p_value": 1.0 if mean == 0 else 0.0,
                "detectable_difference": 0.0}  # fmt: skip
    error = sd / math.sqrt(count)
    return {
        "difference": mean,
        "difference_ci95": [float(bound) for bound in stats.t.interval(0.95, count - 1, loc=mean, scale=error)],
        "p_value": float(stats.ttest_rel(accuracies, baseline).pvalue),
        "detectable_difference": float(
            (stats.t.ppf(1 - SIGNIFICANCE / 2, count - 1) + stats.t.ppf(POWER, count - 1)) * error
        ),
    }


def holm(p_values):
    """Holm's step-down correction of several p-values, in their order."""
    order = np.argsort(p_values, kind="stable")
    corrected, running = [0.0] * len(p_values), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        corrected[index] = running
    return corrected


def verdict(entry, seeds):
    if entry["p_holm"] < SIGNIFICANCE:
        return "better" if entry["difference"] > 0 else "worse"
    return f"not distinguishable from seed noise with {seeds} seeds"


def ensemble_accuracy(paths):
    """The accuracy of the mean of the probabilities that the runs saved in `paths`."""
    saved = [torch.load(path, weights_only=True) for path in paths]
    mean = torch.stack([entry["probabilities"].float() for entry in saved]).mean(0)
    labels = saved[0]["labels"]
    return 100 * (mean.argmax(1) == labels).sum().item() / len(labels)


def summarise(variants, seeds, results, probabilities, base):
    """compare.json's content: each variant's numbers, and each against the baseline. `results` and
    `probabilities` (the runs' .pt files) are per variant name, seed by seed."""
    baseline = [result["accuracy"] for result in results["baseline"]]
    entries = []
    for variant in variants:
        accuracies = [result["accuracy"] for result in results[variant.name]]
        entry = {"name": variant.name, "settings": dict(variant.settings), "flags": list(variant.flags)}
        entry |= {"accuracies": accuracies, **spread(accuracies)}
        entry["ensemble_accuracy"] = ensemble_accuracy(probabilities[variant.name])
        if variant.name != "baseline" and seeds > 1:
            entry.update(paired(baseline, accuracies))
        entries.append(entry)
    compared = [entry for entry in entries if "p_value" in entry]
    for entry, corrected in zip(compared, holm([entry["p_value"] for entry in compared])):
        entry["p_holm"] = corrected
        entry["verdict"] = verdict(entry, seeds)
    split = results["baseline"][0]["split"]
    return {"command": "compare", "split": split, "seeds": list(range(seeds)), "baseline": base, "variants": entries}


# ----------------------------------------------------------------------------------------------
# The answer: compare.json, compare.md, and compare.html with its figure
# ----------------------------------------------------------------------------------------------


def percent(value):
    return "" if value is None else f"{value:.2f}"


def table_rows(summary):
    """(header, rows) of the comparison, one row a variant."""
    header = ("variant", "accuracy % per seed", "mean", "SD", "95 % interval", "ensemble",
              "difference", "95 % interval", "p (Holm)", "detectable", "verdict")  # fmt: skip
    rows = []
    for entry in summary["variants"]:
        compared = "p_holm" in entry
        rows.append(
            (
                entry["name"],
                " ".join(f"{value:.2f}" for value in entry["accuracies"]),
                percent(entry["mean"]),
                "" if entry["sd"] is None else f"{entry['sd']:.3f}",
                "{:.2f} to {:.2f}".format(*entry["ci95"]),
                percent(entry["ensemble_accuracy"]),
                f"{entry['difference']:+.2f}" if compared else "",
                "{:+.2f} to {:+.2f}".format(*entry["difference_ci95"]) if compared else "",
                f"{entry['p_holm']:.3g}" if compared else "",
                f"{entry['detectable_difference']:.2f}" if compared else "",
                entry.get("verdict", "(the baseline)" if entry["name"] == "baseline" else ""),
            )
        )
    return header, rows


def markdown(summary):
    header, rows = table_rows(summary)
    lines = [
        f"# LeNet-5 and its variants, {len(summary['seeds'])} paired seeds, {summary['split']} accuracy",
        "",
        f"Baseline: `{' '.join(summary['baseline']) or 'the defaults'}`",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    return "\n".join(lines) + "\n"


def plot(summary, path):
    """Every seed as a dot, and each variant's mean with its 95 % interval."""
    from companions.reports.grids import new_figure, save_figure

    entries = summary["variants"]
    figure = new_figure(9, 0.55 * len(entries) + 1.4)
    axis = figure.subplots()
    for row, entry in enumerate(entries):
        axis.plot(entry["accuracies"], [row] * len(entry["accuracies"]), "o", color="tab:blue", alpha=0.5, markersize=5)
        low, high = entry["ci95"]
        axis.errorbar(entry["mean"], row + 0.18, xerr=[[entry["mean"] - low], [high - entry["mean"]]], fmt="s",
                      color="black", capsize=3, markersize=4)  # fmt: skip
    axis.set_yticks(range(len(entries)), [entry["name"] for entry in entries])
    axis.invert_yaxis()
    axis.set_xlabel(f"{summary['split']} accuracy (%): each seed a dot; the mean with its 95 % interval below")
    axis.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    save_figure(figure, path)


def html_page(summary, figure_path):
    from companions.reports.report import embedded_figure, html_table

    caption = "Every seed as a dot; each variant's mean with its 95 % interval below its dots."
    return Template(PAGE_FILE.read_text(encoding="utf-8")).substitute(
        title=html.escape(f"LeNet-5 and its variants: {len(summary['seeds'])} paired seeds"),
        baseline=html.escape(" ".join(summary["baseline"]) or "the defaults"),
        split=html.escape(summary["split"]),
        table=html_table(*table_rows(summary)),
        figure=embedded_figure(figure_path, caption),
    )


def write_answer(out_dir, summary):
    files.write_json(out_dir / COMPARE_JSON, summary)
    text = markdown(summary)
    files.write_atomically(out_dir / COMPARE_MD, lambda file: file.write(text.encode()))
    plot(summary, out_dir / COMPARE_PNG)
    page = html_page(summary, out_dir / COMPARE_PNG)
    files.write_atomically(out_dir / COMPARE_HTML, lambda file: file.write(page.encode()))
