"""predict: read your own images with a trained model.

python mnist_recognition.py predict my_digit.jpg another.png --checkpoint outputs/lenet5_mnist.pt
python mnist_recognition.py predict my_digit.jpg --layers inside.png   # the image through every layer
"""

import contextlib
import json
from pathlib import Path

import numpy as np
import torch
from loguru import logger

from companions.doubt.verdicts import VERDICTS
from companions.reports.grids import display_pixels, has_long_names, new_figure, save_figure
from companions.training.devices import pick_device
from companions.training.errors import CliError
from companions.using import numbers
from companions.using.prepare import ImageError, normalised, open_grayscale
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
    return as_answer(probabilities[0], verdict[0], dataset)


def as_answer(probabilities, verdict, dataset):
    """The answer's fields from one input's calibrated probabilities and verdict code."""
    probabilities, verdict = probabilities.cpu().tolist(), VERDICTS[int(verdict)]
    best = int(np.argmax(probabilities))
    return {
        "class": best,
        "name": dataset.classes[best],
        "probability": probabilities[best],
        "verdict": verdict,
        "sure": verdict == "sure",
        "probabilities": probabilities,
    }


# ----------------------------------------------------------------------------------------------
# A whole number: every digit in the image, each with its answer
# ----------------------------------------------------------------------------------------------


NO_LOCK = contextlib.nullcontext()  # read_number's default: the model is this caller's alone
DETECTOR_WEIGHT = 1.0  # how much each unit of the detector's score (log-odds) above that point costs
DETECTOR_SLACK = 4.0  # how far below its threshold the detector's score starts to count against a part


def judge_for(model, learned, device, dataset, lock):
    """The split's judge (companions/using/numbers.py): for a list of 28x28 pixel arrays, (each one's
    score, whether each is read as a digit). The score is the log of its calibrated probability, less
    DETECTOR_WEIGHT for each unit that the detector's score lies above a point DETECTOR_SLACK below
    its threshold: a part that looks less like the dataset's digits scores less, before the detector
    calls it not a digit."""

    def judge(pixel_arrays):
        batch = torch.stack([normalised(pixels, dataset) for pixels in pixel_arrays]).to(device)
        with lock, torch.inference_mode():
            probabilities, detector_scores, verdict = learned.verdicts(model(batch), batch)
        scores = probabilities.max(1).values.clamp_min(1e-12).log()
        if detector_scores is not None:
            above = detector_scores - (learned.not_a_digit_above - DETECTOR_SLACK)
            scores -= DETECTOR_WEIGHT * above.clamp_min(0)
        return scores.cpu().tolist(), (verdict != 2).cpu().tolist()

    return judge


def read_number(model, learned, gray, device, dataset, lock=NO_LOCK):
    """(the answer for the whole number in a grayscale image, the pieces it was read from). Each piece
    gets `answer`'s fields and its box; a small one (a dot, a comma, a dash) is not a digit, and one cut
    from an image's only piece of ink is not sure at best (companions/using/numbers.py). The answer
    adds the digits read ("number": left to right, pieces that are not digits left out) and every
    piece ("digits") to the least sure digit's fields (the only one's, for one digit). The model runs
    under `lock`. Raises prepare's NoInk."""
    found = numbers.digits_in(gray, dataset, judge_for(model, learned, device, dataset, lock))
    inputs = [normalised(piece.pixels, dataset) for piece in found.pieces]
    with lock:
        if len(inputs) == 1:  # one digit: the forward pass predict has always made
            answers = [classify(model, learned, inputs[0], device, dataset)]
        else:
            batch = torch.stack(inputs).to(device)
            with torch.inference_mode():
                probabilities, _, verdicts = learned.verdicts(model(batch), batch)
            answers = [as_answer(probabilities[i], verdicts[i], dataset) for i in range(len(inputs))]
    digits = []
    for piece, piece_answer in zip(found.pieces, answers):
        if piece.small:
            piece_answer |= {"verdict": "not_a_digit", "sure": False}
        elif piece.cut_from_one and piece_answer["sure"]:
            piece_answer |= {"verdict": "not_sure", "sure": False}
        digits.append({**piece_answer, "box": list(piece.box)})
    read = [digit["name"] for digit in digits if digit["verdict"] != "not_a_digit"]
    result = {key: value for key, value in digits[least_sure(digits)].items() if key != "box"}
    result |= {"number": "".join(read), "digits": digits}
    if found.unread:
        result["unread"] = found.unread
    return result, found.pieces


def least_sure(digits):
    """The position of the least sure digit read (of the least sure piece, where none is a digit)."""
    read = [i for i, digit in enumerate(digits) if digit["verdict"] != "not_a_digit"] or range(len(digits))
    return min(read, key=lambda i: digits[i]["probability"])


def describe_prediction(result, dataset):
    """One line per image: describe_number's for several pieces, describe_digit's for one."""
    if len(result.get("digits", ())) > 1:
        return describe_number(result, dataset)
    return describe_digit(result, dataset)


def describe_digit(result, dataset):
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


def describe_number(result, dataset):
    """'number.jpg: 2026 (2 sure, 0 sure, 2 not sure: 61 %, 6 sure)', each piece in reading order;
    one that is no digit says so: '..., not a digit (a guess: 1), ...'."""

    def piece(digit):
        if digit["verdict"] == "not_a_digit":
            return f"{dataset.not_of_kind} (a guess: {digit['name']})"
        if digit["sure"]:
            return f"{digit['name']} sure"
        return f"{digit['name']} not sure: {100 * digit['probability']:.0f} %"

    pieces = ", ".join(piece(digit) for digit in result["digits"])
    number = result["number"] or f"no digits, {len(result['digits'])} pieces that are {dataset.not_of_kind}"
    unread = f"; {result['unread']} more pieces of ink left unread" if result.get("unread") else ""
    return f"{result['file']}: {number} ({pieces}){unread}"


def plot_inputs(inputs, results, path, dataset):
    """One row per image: the image (with each piece's box and answer where there are several), what
    the network sees of each piece, and the ten probabilities of the answer (the least sure digit's)."""
    figure = new_figure(9, 2.6 * len(results))
    axes = figure.subplots(len(results), 3, squeeze=False)
    for row, ((gray, network_inputs), result) in zip(axes, zip(inputs, results)):
        row[0].imshow(gray, cmap="gray", vmin=0, vmax=255)
        row[0].set_title(Path(result["file"]).name, fontsize=9)
        if len(result["digits"]) > 1:
            draw_boxes(row[0], result["digits"], dataset)
        seen = np.concatenate([display_pixels(network_input, dataset) for network_input in network_inputs], axis=1)
        row[1].imshow(seen, cmap="gray", vmin=0, vmax=1)
        row[1].set_title("network input (28x28" + (" each)" if len(network_inputs) > 1 else ")"), fontsize=9)
        for axis in row[:2]:
            axis.axis("off")
        bars = row[2].bar(range(10), result["probabilities"], color="lightgray")
        bars[result["class"]].set_color("tab:blue")
        guess = f"{dataset.not_of_kind} (a guess: {result['name']})" if result["verdict"] == "not_a_digit" else None
        title = guess or f"predicted {result['name']}"
        if len(result["digits"]) > 1:
            title = f"read {result['number'] or 'no digit'}; least sure: {result['name']}"
        row[2].set(xticks=range(10), ylim=(0, 1), title=title)
        row[2].set_xticklabels(dataset.classes, fontsize=7, rotation=45 if has_long_names(dataset) else 0)
    figure.tight_layout()
    save_figure(figure, path)


VERDICT_COLOURS = {"sure": "tab:green", "not_sure": "tab:orange", "not_a_digit": "tab:gray"}


def draw_boxes(axis, digits, dataset):
    """Each piece's box on the image, coloured by its verdict, with its answer above it."""
    from matplotlib.patches import Rectangle

    for digit in digits:
        x0, y0, x1, y1 = digit["box"]
        colour = VERDICT_COLOURS[digit["verdict"]]
        axis.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=1.5))
        text = "?" if digit["verdict"] == "not_a_digit" else digit["name"] + ("" if digit["sure"] else "?")
        axis.text(x0, y0 - 2, text, color=colour, fontsize=10, fontweight="bold", va="bottom")


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
            gray = open_grayscale(path)
            result, pieces = read_number(model, learned, gray, device, dataset)
        except ImageError as error:
            logger.error("{}: {}.", path, error)
            failures += 1
            continue
        if result.get("unread"):
            logger.warning("{}: read the first {} pieces of ink, left {} more unread (a page of text or a texture?).",
                           path, numbers.MAX_PIECES, result["unread"])  # fmt: skip
        inputs.append((gray, [normalised(piece.pixels, dataset) for piece in pieces]))
        results.append({"file": str(path), **result})
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for result in results:
            print(describe_prediction(result, dataset))
    if args.show and results:
        plot_inputs(inputs, results, args.show, dataset)
        logger.info("Wrote {}", args.show)
    if args.layers and results:
        plot_layers(model, inputs[0][1][least_sure(results[0]["digits"])], results[0], args.layers, dataset)
    return 1 if failures else 0


def plot_layers(model, network_input, result, path, dataset):
    """The first image through every layer, titled with its answer's probability as printed."""
    from companions.reports import inside

    seen = inside.look_inside(model, network_input, dataset)
    heading = f"{result['file']} inside LeNet-5"
    inside.plot_inside(seen, path, dataset, heading, result["probability"])
    logger.info("Wrote {}", path)
