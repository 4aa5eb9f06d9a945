"""predict: read your own images with a trained model.

python mnist_recognition.py predict my_digit.jpg another.png --checkpoint outputs/lenet5_mnist.pt
python mnist_recognition.py predict my_digit.jpg --layers inside.png   # the image through every layer
"""

import json
from pathlib import Path

import numpy as np
import torch
from loguru import logger

from companions.doubt.verdicts import VERDICTS
from companions.reports.grids import display_pixels, has_long_names, new_figure, save_figure
from companions.training.devices import pick_device
from companions.training.errors import CliError
from companions.using.prepare import ImageError, read_image
from companions.using.trained import doubt_of, trained_model


def classify(model, learned, network_input, device, dataset):
    """The model's answer for one prepared input (see answer)."""
    batch = network_input.unsqueeze(0).to(device)
    with torch.inference_mode():
        return answer(model(batch)[0], learned, batch, dataset)


def answer(scores, learned, network_input, dataset):
    """The answer that the 10 scores (logits) of one input (1 x 1 x 28 x 28) give, with the model's
    doubt (companions/doubt/verdicts.py): class, name, calibrated probability, verdict ("sure", "not_sure",
    or "not_a_digit", where the class is only a guess), sure (whether the verdict is "sure"), and
    all ten probabilities."""
    probabilities, _, verdict = learned.verdicts(scores.unsqueeze(0), network_input)
    probabilities, verdict = probabilities[0].cpu().tolist(), VERDICTS[int(verdict[0])]
    best = int(np.argmax(probabilities))
    return {
        "class": best,
        "name": dataset.classes[best],
        "probability": probabilities[best],
        "verdict": verdict,
        "sure": verdict == "sure",
        "probabilities": probabilities,
    }


def describe_prediction(result, dataset):
    """'my_digit.jpg: 7 (99.7 %), then 3 (0.2 %), 9 (0.0 %)', '... 7 (51.2 %, not sure), then ...',
    or 'zigzag.png: not a digit (a guess: 4, 99.1 %), then ...'"""
    classes = dataset.classes
    ranked = np.argsort(result["probabilities"])[::-1]
    others = ", ".join(f"{classes[c]} ({100 * result['probabilities'][c]:.1f} %)" for c in ranked[1:3])
    percent = f"{100 * result['probability']:.1f} %"
    if result["verdict"] == "not_a_digit":
        return f"{result['file']}: {dataset.not_of_kind} (a guess: {result['name']}, {percent}), then {others}"
    unsure = "" if result["sure"] else ", not sure"
    return f"{result['file']}: {result['name']} ({percent}{unsure}), then {others}"


def plot_inputs(inputs, results, path, dataset):
    """One row per input: the image, what the network sees, and its ten probabilities."""
    figure = new_figure(9, 2.6 * len(results))
    axes = figure.subplots(len(results), 3, squeeze=False)
    for row, ((gray, network_input), result) in zip(axes, zip(inputs, results)):
        row[0].imshow(gray, cmap="gray", vmin=0, vmax=255)
        row[0].set_title(Path(result["file"]).name, fontsize=9)
        row[1].imshow(display_pixels(network_input, dataset), cmap="gray", vmin=0, vmax=1)
        row[1].set_title("network input (28x28)", fontsize=9)
        for axis in row[:2]:
            axis.axis("off")
        bars = row[2].bar(range(10), result["probabilities"], color="lightgray")
        bars[result["class"]].set_color("tab:blue")
        guess = f"{dataset.not_of_kind} (a guess: {result['name']})" if result["verdict"] == "not_a_digit" else None
        row[2].set(xticks=range(10), ylim=(0, 1), title=guess or f"predicted {result['name']}")
        row[2].set_xticklabels(dataset.classes, fontsize=7, rotation=45 if has_long_names(dataset) else 0)
    figure.tight_layout()
    save_figure(figure, path)


def command(args):
    """Read each image, print the model's answers; exit code 1 if any image could not be read."""
    if args.layers and len(args.images) != 1:
        raise CliError(f"--layers draws one image through the network: give one image file, not {len(args.images)}.")
    device = pick_device(args.device)
    model, payload, dataset = trained_model(args, device)
    learned = doubt_of(payload, args.checkpoint, device)
    inputs, results, failures = [], [], 0
    for path in args.images:
        try:
            gray, network_input = read_image(path, dataset)
        except ImageError as error:
            logger.error("{}: {}.", path, error)
            failures += 1
            continue
        inputs.append((gray, network_input))
        results.append({"file": str(path), **classify(model, learned, network_input, device, dataset)})
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for result in results:
            print(describe_prediction(result, dataset))
    if args.show and results:
        plot_inputs(inputs, results, args.show, dataset)
        logger.info("Wrote {}", args.show)
    if args.layers and results:
        plot_layers(model, inputs[0][1], results[0], args.layers, dataset)
    return 1 if failures else 0


def plot_layers(model, network_input, result, path, dataset):
    """The first image through every layer, titled with its answer's probability as printed."""
    from companions.reports import inside

    seen = inside.look_inside(model, network_input, dataset)
    heading = f"{result['file']} inside LeNet-5"
    inside.plot_inside(seen, path, dataset, heading, result["probability"])
    logger.info("Wrote {}", path)
