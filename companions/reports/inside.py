"""Inside a trained LeNet-5: every layer's values for one image, from the forward pass that gives the
answer; why it answered; what its filters learned. serve's page, predict --layers and the training
report show them.

Why: gradient x input, against the blank page. For each input pixel, the gradient of the top class's
score times how far the pixel is from the background: how much that pixel's ink moved the score.
The same with the score of the top class minus the runner-up's says what set the two apart.

Colours: each layer has its own diverging scale, centred on 0 and symmetric (-R .. R, R the largest
size in that layer), so that the maps of one layer compare honestly: red above 0, blue below.
Convolutions and linear layers show their output before the activation: the blue that ReLU sets to 0.
"""

import string
from dataclasses import dataclass

import numpy as np
import torch

from companions.reports.grids import display_pixels, has_long_names, new_figure, save_figure
from companions.training.layers import named_layers

COLOURS = "bwr"  # blue, white at 0, red: the page draws the same scale (page.html)
GAP_COLOUR = "#d0d0d0"


@dataclass
class Inside:
    """What one image does inside the network (CPU tensors)."""

    layers: list  # [(name, values of one image)] in forward order: the normalised input first
    scores: torch.Tensor  # the 10 scores (logits)
    attribution: torch.Tensor  # 28 x 28: how much each pixel moved the top class's score
    runner_up: int  # the class with the second highest score
    contrast: torch.Tensor  # 28 x 28: how much each pixel moved the top class's score above the runner-up's
    filters: torch.Tensor  # conv1's filters: 6 x 5 x 5

    @property
    def top(self):
        return int(self.scores.argmax())

    @property
    def probabilities(self):
        return torch.softmax(self.scores, 0)


def recorded(model, images):
    """(model(images), {layer name: its output}): the output of every layer of one forward pass."""
    outputs = {}

    def record(name):
        def hook(module, inputs, output):
            outputs[name] = output.detach().clone()  # a copy: the in-place ReLU after it would change it

        return hook

    hooks = [module.register_forward_hook(record(name)) for name, module, _ in named_layers(model)]
    try:
        scores = model(images)
    finally:
        for hook in hooks:
            hook.remove()
    return scores, outputs


def blank_input(dataset):
    """The normalised value of an empty (background) pixel."""
    return -dataset.mean / dataset.std


def look_inside(model, network_input, dataset):
    """What one normalised 1 x 28 x 28 input does inside the model: one forward pass with every layer
    recorded, and two backward passes to the input."""
    device = next(model.parameters()).device
    image = network_input.unsqueeze(0).to(device).requires_grad_()
    with torch.enable_grad():
        scores, outputs = recorded(model, image)
        top, runner_up = scores[0].topk(2).indices.tolist()
        (towards_top,) = torch.autograd.grad(scores[0, top], image, retain_graph=True)
        (apart,) = torch.autograd.grad(scores[0, top] - scores[0, runner_up], image)
    ink = (image.detach() - blank_input(dataset))[0, 0]
    layers = [("input", network_input.float().cpu())] + [(name, value[0].cpu()) for name, value in outputs.items()]
    conv1 = next(module for name, module, _ in named_layers(model) if name == "conv1")
    return Inside(
        layers=layers,
        scores=scores.detach()[0].cpu(),
        attribution=(towards_top[0, 0] * ink).cpu(),
        runner_up=runner_up,
        contrast=(apart[0, 0] * ink).cpu(),
        filters=conv1.weight.detach()[:, 0].cpu(),
    )


def deletion_check(model, network_input, dataset, share=0.2, random_draws=10):
    """How far the top class's probability falls when the ink that the attribution ranks highest is
    erased (a `share` of the ink, set to the background), and when as much ink is erased at random
    (the mean of several draws): (before, most attributed erased, random erased). A faithful
    attribution makes the second far lower than the third."""
    seen = look_inside(model, network_input, dataset)
    blank = blank_input(dataset)
    ink = (network_input[0] > blank + 1e-3).flatten().nonzero().squeeze(1)
    erased_count = max(1, int(share * len(ink)))

    @torch.no_grad()
    def probability_without(pixels):
        erased = network_input.clone().flatten()
        erased[pixels] = blank
        device = next(model.parameters()).device
        return torch.softmax(model(erased.view(1, *network_input.shape).to(device)), 1)[0, seen.top].item()

    most = ink[seen.attribution.flatten()[ink].argsort(descending=True)[:erased_count]]
    generator = torch.Generator().manual_seed(0)
    draws = [ink[torch.randperm(len(ink), generator=generator)[:erased_count]] for _ in range(random_draws)]
    at_random = sum(probability_without(pixels) for pixels in draws) / random_draws
    return seen.probabilities[seen.top].item(), probability_without(most), at_random


def rounded(values):
    """As JSON numbers with 6 decimals: far finer than float32's error, a third of the text."""
    return np.round(values.contiguous().numpy().astype(np.float64), 6).tolist()


def as_json(inside):
    """The JSON-ready inside: "layers" [{"name", "shape", "values"}] (conv1's also with its "filters"),
    "attribution" [28, 28], and "runner_up" {"class", "attribution"}."""
    layers = []
    for name, values in inside.layers:
        layer = {"name": name, "shape": list(values.shape), "values": rounded(values)}
        if name == "conv1":
            layer["filters"] = rounded(inside.filters)
        layers.append(layer)
    return {
        "layers": layers,
        "attribution": rounded(inside.attribution),
        "runner_up": {"class": inside.runner_up, "attribution": rounded(inside.contrast)},
    }


# ----------------------------------------------------------------------------------------------
# Figures: maps laid out as mosaics, one colour scale per layer
# ----------------------------------------------------------------------------------------------


def mosaic(maps, columns):
    """Maps (N x H x W) side by side, `columns` to a row, a one-pixel gap (NaN) between them."""
    maps = np.asarray(maps, dtype=np.float32)
    count, height, width = maps.shape
    rows = -(-count // columns)
    sheet = np.full((rows * (height + 1) - 1, columns * (width + 1) - 1), np.nan, dtype=np.float32)
    for index, single in enumerate(maps):
        top, left = (index // columns) * (height + 1), (index % columns) * (width + 1)
        sheet[top : top + height, left : left + width] = single
    return sheet


def symmetric_range(values):
    """R of the scale -R .. R: the largest size among the values (never 0)."""
    return max(float(np.nanmax(np.abs(values))), 1e-12)


def show_diverging(figure, axis, sheet, title, limit=None, aspect=None):
    """A mosaic on the diverging scale centred on 0, with its colour bar."""
    from matplotlib import colormaps

    limit = limit or symmetric_range(sheet)
    colours = colormaps[COLOURS].with_extremes(bad=GAP_COLOUR)
    image = axis.imshow(sheet, cmap=colours, vmin=-limit, vmax=limit, interpolation="nearest", aspect=aspect)
    axis.set_title(title, fontsize=9, loc="left")
    axis.set_xticks([])
    axis.set_yticks([])
    figure.colorbar(image, ax=axis, fraction=0.03, pad=0.01, aspect=12)


def overlay(figure, axis, pixels, attribution, title):
    """The attribution on the diverging scale over the input in grey (faint where it is small), with its colour bar."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    values = np.asarray(attribution)
    limit = symmetric_range(values)
    axis.imshow(pixels, cmap="gray_r", vmin=0, vmax=1)
    axis.imshow(values, cmap=COLOURS, vmin=-limit, vmax=limit, alpha=np.clip(np.abs(values) / limit * 1.5, 0, 0.9))
    axis.set_title(title, fontsize=9)
    axis.set_xticks([])
    axis.set_yticks([])
    scale = ScalarMappable(Normalize(-limit, limit), COLOURS)
    figure.colorbar(scale, ax=axis, fraction=0.05, pad=0.02, aspect=12)


MAP_COLUMNS = {"conv1": 6, "pool1": 6, "conv2": 8, "pool2": 8}  # a deeper network's conv1b, ... as its stage's


def map_columns(name):
    return MAP_COLUMNS.get(name.rstrip(string.ascii_lowercase))


def plot_inside(inside, path, dataset, heading, probability=None):
    """predict --layers: one image through every layer, why it answered, and the scores, titled with
    `probability`, the answer's (calibrated, as predict prints it; the softmax of the scores without one)."""
    layers = dict(inside.layers)
    maps = [name for name in layers if map_columns(name)]
    figure = new_figure(11, 2.6 + 1.9 * len(maps) + 1.2)
    figure.set_layout_engine("constrained")
    rows = figure.add_gridspec(2 + len(maps), 1, height_ratios=[2.6] + [1.9] * len(maps) + [1.2])
    top = rows[0].subgridspec(1, 4, width_ratios=[1, 1, 1, 2.2])
    pixels = display_pixels(layers["input"], dataset)
    show_diverging(figure, figure.add_subplot(top[0]), layers["input"][0].numpy(), "input (normalised)")
    best, runner_up = dataset.classes[inside.top], dataset.classes[inside.runner_up]
    overlay(figure, figure.add_subplot(top[1]), pixels, inside.attribution, f"why {best}")
    overlay(figure, figure.add_subplot(top[2]), pixels, inside.contrast, f"why {best}, not {runner_up}")
    plot_scores(figure.add_subplot(top[3]), inside, dataset, probability)
    for index, name in enumerate(maps, start=1):
        values = layers[name].numpy()
        shape = "x".join(str(size) for size in values.shape)
        show_diverging(figure, figure.add_subplot(rows[index]), mosaic(values, map_columns(name)), f"{name} ({shape})")
    strips = rows[len(maps) + 1].subgridspec(1, 2)
    for column, name in enumerate(("fc1", "fc2")):
        values = layers[name].numpy()
        axis = figure.add_subplot(strips[column])
        show_diverging(figure, axis, values[None, :], f"{name} ({len(values)})")
        axis.set_aspect("auto")
    figure.suptitle(heading, fontsize=11)
    save_figure(figure, path)


def plot_scores(axis, inside, dataset, probability=None):
    scores = inside.scores.numpy()
    bars = axis.bar(range(len(scores)), scores, color="lightgray")
    bars[inside.top].set_color("tab:red")
    axis.axhline(0, color="black", linewidth=0.6)
    axis.set_xticks(range(len(scores)))
    axis.set_xticklabels(dataset.classes, fontsize=7, rotation=45 if has_long_names(dataset) else 0)
    probability = inside.probabilities[inside.top].item() if probability is None else probability
    axis.set_title(f"fc3: the 10 scores ({dataset.classes[inside.top]}, {100 * probability:.1f} %)", fontsize=9)


def plot_filters(model, path):
    """conv1's 6 filters, and conv2's 16 x 6 (a column per map it makes, a row per map it reads)."""
    stages = {
        name: module.weight.detach().cpu() for name, module, _ in named_layers(model) if name in ("conv1", "conv2")
    }
    conv1, conv2 = stages["conv1"], stages["conv2"]  # each stage's 5x5 convolution
    figure = new_figure(9, 5.5)
    figure.set_layout_engine("constrained")
    rows = figure.add_gridspec(2, 1, height_ratios=[1, conv2.shape[1] / 3])
    show_diverging(figure, figure.add_subplot(rows[0]), mosaic(conv1[:, 0], conv1.shape[0]), "conv1's 6 filters (5x5)")
    by_input = conv2.permute(1, 0, 2, 3).reshape(-1, *conv2.shape[2:])  # row: an input map; column: an output map
    title = f"conv2's {conv2.shape[0]}x{conv2.shape[1]} filters: a column per map it makes, a row per map it reads"
    show_diverging(figure, figure.add_subplot(rows[1]), mosaic(by_input, conv2.shape[0]), title)
    save_figure(figure, path)


def first_of_each_class(labels, classes):
    """The index of the first image of each class (of those that have one)."""
    return [int(np.flatnonzero(labels == c)[0]) for c in range(classes) if (labels == c).any()]


@torch.no_grad()
def plot_class_maps(model, eval_set, split, path, dataset):
    """One image of each class (the split's first) through conv1 and conv2."""
    images, labels = eval_set
    chosen = first_of_each_class(labels.cpu().numpy(), len(dataset.classes))
    was_training = model.training
    model.eval()
    _, outputs = recorded(model, images[chosen])
    model.train(was_training)
    pixels = mosaic(np.stack([display_pixels(images[i], dataset) for i in chosen]), 1)
    sheets = {
        name: mosaic(maps.float().cpu().numpy().reshape(-1, *maps.shape[2:]), maps.shape[1])
        for name, maps in outputs.items()
        if name in ("conv1", "conv2")
    }
    # Each sheet as tall as the others, so that a row is one image throughout.
    widths = [sheet.shape[1] / sheet.shape[0] for sheet in (pixels, *sheets.values())]
    widths = [widths[0], *(1.15 * width for width in widths[1:])]  # room for the colour bars
    figure = new_figure(12, 10.5 / sum(widths) + 0.5)
    figure.set_layout_engine("constrained")
    cells = figure.add_gridspec(1, len(widths), width_ratios=widths)
    axis = figure.add_subplot(cells[0])
    axis.imshow(pixels, cmap="gray_r", vmin=0, vmax=1, aspect="auto")
    axis.set_title(split, fontsize=9)
    axis.set_yticks([(28 + 1) * row + 14 for row in range(len(chosen))], [dataset.classes[labels[i]] for i in chosen])
    axis.set_xticks([])
    for index, (name, sheet) in enumerate(sheets.items(), start=1):
        show_diverging(figure, figure.add_subplot(cells[index]), sheet, name, aspect="auto")
    save_figure(figure, path)
