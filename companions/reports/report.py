"""The figures that explain a run, and report.html: one self-contained page with every number and figure.

Training writes all of them after its model file; evaluate writes the evaluation's figures and a
report of its own. The page's layout is report_page.html beside this file. What a page shows is
handed in: nothing here imports the training script.
"""

import base64
import contextlib
import functools
import hashlib
import html
import importlib.metadata
import multiprocessing
import platform
import sys
import time
from pathlib import Path
from string import Template

import numpy as np
import torch

from companions.reports.grids import grid_title, has_long_names, new_figure, plot_digit_grid, save_figure
from companions.training import files
from companions.training.command_line import as_text, plural
from companions.training.files import (
    CALIBRATION_PNG,
    CONFUSION_PNG,
    CURVES_PNG,
    EVALUATION_FIGURES,
    FILTERS_PNG,
    LAYER_MAPS_PNG,
    METRICS_FILE,
    MISTAKES_PNG,
    PREDICTIONS_PNG,
    REPORT_FILE,
    TRAIN_IMAGES_PNG,
    split_images_png,
    training_figures,
)
from companions.training.layers import rows_as_text, totals

PAGE_FILE = Path(__file__).with_name("report_page.html")
FIGURE_CAPTIONS = {
    CURVES_PNG: "Loss (log scale) and accuracy against epochs. The thin line is the training loss of every log "
    "interval; the points are each epoch's means.",
    CONFUSION_PNG: "True class against predicted class. Each cell holds a count and is coloured by its share of the "
    "true class; each class's accuracy stands at the right of its row.",
    MISTAKES_PNG: "The wrong answers the model gave with the highest confidence.",
    PREDICTIONS_PNG: "16 random evaluation images with the model's answer; wrong answers are red.",
    CALIBRATION_PNG: "Left: how far the probabilities can be trusted. The answers are put in 15 bins by their "
    "probability; each point is a bin's accuracy against its mean probability, before and after the temperature "
    "fitted on training images (the table says which; on the dashed line, a probability of 0.9 is right 9 times "
    "in 10). "
    "Right: the accuracy of the answers the model is surest of against the share of answers it gives; the "
    "dashed line is where it stops being sure ('not sure' or 'not a digit').",
    TRAIN_IMAGES_PNG: "16 random training images with their labels.",
    split_images_png("test"): "16 random test images with their labels.",
    split_images_png("validation"): "16 random validation images (held out from the training split) with their labels.",
    FILTERS_PNG: "What the convolutions learned: conv1's 6 filters of 5x5 pixels, and conv2's 16 filters, each 6 of "
    "5x5 (one per conv1 map it reads). Each layer has its own colour scale, centred on 0: red weights add what they "
    "cover, blue ones subtract it.",
    LAYER_MAPS_PNG: "The first evaluation image of each class through conv1 (6 maps) and conv2 (16 maps), before "
    "ReLU: red where a filter found its pattern, blue where ReLU will set the map to 0. One colour scale per layer, "
    "centred on 0.",
}


def write_training_report(
    out_dir, config, network, costs, dataset, runtime, model, progress, evaluation, timeline, trust
):
    """A training run's report.html, once its figures are written, and last metrics.json, which times
    the rest. `config` is the run's settings, as checkpoints record them; `network` names the
    network and its parameter count; `costs` are its layers' (companions/training/layers.py)."""
    split = evaluation.split
    training_seconds = sum(summary["seconds"] for summary in progress.history)
    title = f"{network} on {dataset.title}, recipe {config['recipe']}: {evaluation.accuracy:.2f} % {split} accuracy"
    headline = (
        f"{evaluation.accuracy:.3f} % of {len(evaluation.labels)} {split} images right after "
        f"{plural(len(progress.history), 'epoch')} ({training_seconds:.1f} s of training)"
    )
    sections = report_sections(config, environment(runtime), evaluation, dataset, progress.history)
    sections.append((f"Layers (batch {config['batch_size']})", layers_table(costs)))
    sections.append(trust_section(trust))
    write_report(out_dir, title, headline, sections, training_figures(split))
    write_training_metrics(out_dir, config, costs, dataset, runtime, model, progress, evaluation, timeline, trust)


def write_training_metrics(out_dir, config, costs, dataset, runtime, model, progress, evaluation, timeline, trust):
    """A training run's metrics.json, written last: it times the rest."""
    split = evaluation.split
    training_seconds = sum(summary["seconds"] for summary in progress.history)
    timeline["written"] = time.time()
    metrics = {
        "command": "train",
        "config": config,
        "versions": {"torch": torch.__version__, "torchvision": importlib.metadata.version("torchvision")},
        "script_sha256": source_hash(),
        "device": str(runtime.device),
        "world_size": runtime.world_size,
        "backend": runtime.backend,
        "precision": precision_settings(runtime.device),
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "layers": {"batch_size": config["batch_size"], "rows": costs, "totals": totals(costs)},
        "epochs": progress.history,
        "eval_split": split,
        "eval_accuracy": evaluation.accuracy,
        "eval_images": len(evaluation.labels),
        "classes": list(dataset.classes),
        "class_accuracy": evaluation.class_accuracy(),
        "confusion_matrix": evaluation.confusion_matrix().tolist(),
        "trust": trust.summary(),
        "training_seconds": training_seconds,
        "total_seconds": timeline["written"] - timeline["main"],  # from the start of training to here
        "timeline": timeline,
    }
    files.write_json(out_dir / METRICS_FILE, metrics)


@contextlib.contextmanager
def drawn_beside(draw, *args):
    """draw(*args) in a forked copy of this process while the with-block runs in this one, so that
    two cores draw figures; joined at the end of the block. Where fork is not to be had (or not
    safe: macOS), or the copy failed, draw runs here after the block, and its errors are reported
    as any other's. Each figure is still written atomically, by whichever process draws it."""
    import matplotlib.figure  # noqa: F401  (once, before the fork, for both processes)

    copy = None
    if sys.platform == "linux":
        copy = multiprocessing.get_context("fork").Process(target=exit_code_of, args=(draw, *args), daemon=True)
        copy.start()
    try:
        yield
    finally:
        if copy is not None:
            copy.join()
    if copy is None or copy.exitcode != 0:
        draw(*args)


def exit_code_of(draw, *args):
    """In the forked copy: draw, and end with exit code 1 and no traceback where it fails (this
    process then draws again, and says why)."""
    torch.set_num_threads(1)  # as torch's DataLoader workers do: a forked copy cannot use the parent's thread pool
    try:
        draw(*args)
    except Exception:
        sys.exit(1)


def draw_inside_figures(out_dir, model, eval_set, split, dataset):
    """What the network learned: its filters, and one image of each class through its convolutions."""
    from companions.reports import inside

    inside.plot_filters(model, out_dir / FILTERS_PNG)
    inside.plot_class_maps(model, eval_set, split, out_dir / LAYER_MAPS_PNG, dataset)


# ----------------------------------------------------------------------------------------------
# Figures of an evaluation: which classes it confuses, and its worst mistakes
# ----------------------------------------------------------------------------------------------


def write_evaluation_report(out_dir, runtime, evaluation, dataset, settings, title, headline, trust):
    """What evaluate writes once the evaluation's figures are drawn: a report.html that shows them."""
    sections = [*report_sections(settings, environment(runtime), evaluation, dataset), trust_section(trust)]
    write_report(out_dir, title, headline, sections, EVALUATION_FIGURES)


def trust_section(trust):
    return f"How far to trust it ({trust.split} images)", html_table(("what", "value"), trust.table_rows())


def plot_mistakes(eval_set, evaluation, path, dataset):
    """The 16 wrong answers given with the highest confidence."""
    worst = evaluation.worst_mistakes()
    titles = [
        grid_title(
            evaluation.predicted[i].item(),
            evaluation.labels[i].item(),
            dataset.classes,
            evaluation.confidence[i].item(),
        )
        for i in worst
    ]
    wrong = int((evaluation.predicted != evaluation.labels).sum())
    heading = f"The {len(worst)} most confident mistakes of {wrong} on {evaluation.split} images"
    plot_digit_grid(eval_set[0][worst], titles, heading, path, dataset, ["red"] * len(worst), title_size=9)


def plot_confusion_matrix(evaluation, path, dataset):
    """True against predicted class, coloured by each row's share, the count in every cell."""
    counts = evaluation.confusion_matrix().numpy()
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    figure = new_figure(7, 6)
    axis = figure.subplots()
    image = axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for true_class in range(10):
        for predicted in range(10):
            color = "white" if shares[true_class, predicted] > 0.5 else "black"
            axis.text(
                predicted, true_class, counts[true_class, predicted], ha="center", va="center", fontsize=8, color=color
            )
    for true_class, accuracy in enumerate(evaluation.class_accuracy()):
        axis.text(10, true_class, f"{accuracy:.1f} %", ha="left", va="center", fontsize=8)
    title = f"Confusion matrix on {len(evaluation.labels)} {evaluation.split} images (accuracy per class at right)"
    axis.set(xticks=range(10), yticks=range(10), xlabel="predicted class", ylabel="true class", title=title)
    long_names = has_long_names(dataset)
    axis.set_xticklabels(dataset.classes, rotation=45 if long_names else 0, ha="right" if long_names else "center")
    axis.set_yticklabels(dataset.classes)
    axis.title.set_fontsize(10)
    figure.colorbar(image, ax=axis, fraction=0.04, pad=0.12, label="share of the true class")
    figure.tight_layout()
    save_figure(figure, path)


# ----------------------------------------------------------------------------------------------
# Figure of a training run: how it learned
# ----------------------------------------------------------------------------------------------


def training_measured_on(args):
    """What the train loss and accuracy were measured on, where it is not the plain images and loss
    that evaluation uses ('' otherwise): why they may sit far from the evaluation's."""
    conditions = (["augmented images"] if args.augment != "none" else []) + (
        [f"label smoothing {args.label_smoothing:g}"] if args.label_smoothing else []
    )
    return ", ".join(conditions)


def plot_training_curves(progress, split, path, measured_on=""):
    """Loss and accuracy against epochs: every log line's loss, and each epoch's train and evaluation
    values; `measured_on` says under the titles what the train values were measured on."""
    from matplotlib.ticker import MaxNLocator

    history = progress.history
    epochs = [summary["epoch"] for summary in history]
    evaluated = [summary for summary in history if summary["eval_loss"] is not None]
    evaluated_epochs = [summary["epoch"] for summary in evaluated]
    figure = new_figure(10, 4)
    loss_axis, accuracy_axis = figure.subplots(1, 2)
    if progress.logged_losses:
        at, losses = zip(*progress.logged_losses)
        loss_axis.plot(at, losses, linewidth=0.8, color="tab:blue", alpha=0.5, label="train loss (log lines)")
    loss_axis.plot(epochs, [s["loss"] for s in history], "o", color="tab:blue", label="train loss (epoch)")
    loss_axis.plot(
        evaluated_epochs, [s["eval_loss"] for s in evaluated], "s", color="tab:orange", label=f"{split} loss"
    )
    loss_axis.set(xlabel="epoch", ylabel="cross-entropy loss", yscale="log", title="Loss")
    accuracy_axis.plot(epochs, [s["train_accuracy"] for s in history], "o-", color="tab:blue", label="train accuracy")
    accuracy_axis.plot(
        evaluated_epochs, [s["eval_accuracy"] for s in evaluated], "s-", color="tab:orange", label=f"{split} accuracy"
    )
    accuracy_axis.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    for axis in (loss_axis, accuracy_axis):
        if measured_on:
            axis.set_title(f"{axis.get_title()}\n(train: {measured_on})", fontsize=9)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(epochs) == 1:  # one epoch (the fast recipe) from its start: alone, its point gets an axis of fractions
            axis.set_xlim(0, 1.1)
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    save_figure(figure, path)


# ----------------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------------


def write_report(out_dir, title, headline, sections, figure_names):
    """report.html: `sections` are (heading, HTML) pairs; the figures named are embedded, so the
    page needs nothing outside itself."""
    page = Template(PAGE_FILE.read_text(encoding="utf-8")).substitute(
        title=html.escape(title),
        headline=html.escape(headline),
        sections="".join(
            f"<section><h2>{html.escape(heading)}</h2>{content}</section>" for heading, content in sections
        ),
        figures="".join(embedded_figure(out_dir / name, FIGURE_CAPTIONS[name]) for name in figure_names),
    )
    files.write_atomically(out_dir / REPORT_FILE, lambda file: file.write(page.encode()))


def report_sections(settings, environment_values, evaluation, dataset, history=()):
    """(heading, HTML table) pairs: the settings, the environment, the epochs, the classes."""
    sections = [
        ("Settings", html_table(("setting", "value"), [(name, as_text(v)) for name, v in settings.items()])),
        ("Environment", html_table(("what", "value"), environment_values.items())),
    ]
    if history:
        sections.append(("Per epoch", epochs_table(history, evaluation.split)))
    rows = [
        (index, name, int(count), f"{accuracy:.2f}")
        for index, (name, count, accuracy) in enumerate(
            zip(dataset.classes, evaluation.confusion_matrix().sum(1), evaluation.class_accuracy())
        )
    ]
    sections.append(("Accuracy per class", html_table(("class", "name", "images", "accuracy %"), rows)))
    return sections


def layers_table(costs):
    """Each layer's output shape, parameters, multiply-adds per image and activation memory, and the totals."""
    return html_table(("layer", "output", "parameters", "multiply-adds per image", "activations"), rows_as_text(costs))


def epochs_table(history, split):
    columns = {
        "epoch": ("epoch", "{}"),
        "loss": ("loss", "{:.4f}"),
        "train_accuracy": ("train accuracy", "{:.2f}"),
        "eval_loss": (f"{split} loss", "{:.4f}"),
        "eval_accuracy": (f"{split} accuracy", "{:.2f}"),
        "seconds": ("seconds", "{:.1f}"),
    }
    rows = [
        ["" if summary[key] is None else form.format(summary[key]) for key, (_, form) in columns.items()]
        for summary in history
    ]
    return html_table([heading for heading, _ in columns.values()], rows)


def html_table(header, rows):
    def cells(row, tag):
        return "".join(f"<{tag}>{html.escape(str(cell))}</{tag}>" for cell in row)

    return (
        f"<table><tr>{cells(header, 'th')}</tr>" + "".join(f"<tr>{cells(row, 'td')}</tr>" for row in rows) + "</table>"
    )


def embedded_figure(path, caption):
    data = base64.b64encode(path.read_bytes()).decode()
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(path.name)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def cpu_name():
    """The CPU's model name as Linux reports it (platform.processor() is empty there)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def environment(runtime):
    device_name = torch.cuda.get_device_name(runtime.device) if runtime.device.type == "cuda" else cpu_name()
    return {
        "torch": torch.__version__,
        "torchvision": importlib.metadata.version("torchvision"),
        "python": platform.python_version(),
        "device": f"{runtime.device} ({device_name})",
        "CPU threads": torch.get_num_threads(),
        "world size": runtime.world_size,
        "script sha256": source_hash(),
    }


def precision_settings(device):
    """What metrics.json records about the arithmetic of a run on `device`."""
    settings = {"dtype": "float32"}
    if device.type == "cuda":
        settings.update(
            {
                "gpu": torch.cuda.get_device_name(device),
                "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version(),
                "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                "tf32_cudnn": torch.backends.cudnn.allow_tf32,
                "cudnn_deterministic": torch.backends.cudnn.deterministic,
                "cudnn_benchmark": torch.backends.cudnn.benchmark,
                "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            }
        )
    return settings


@functools.cache
def source_hash():
    """A short hash of the program's source (mnist_recognition.py and every file of companions/), so
    that a result can be traced to the code that made it."""
    companions = Path(__file__).resolve().parent.parent
    files = [companions.parent / "mnist_recognition.py", *sorted(companions.rglob("*.py"))]
    files += [*sorted(companions.rglob("*.html")), *sorted(companions.rglob("*.js"))]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]
