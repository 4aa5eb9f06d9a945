#!/usr/bin/env python3
"""Which way of saying "not a digit" generalises to kinds of images it never saw: five compared.

    python mnist_recognition.py --validation 10000 --out-dir outputs/validation
    python benchmarks/not_a_digit.py --checkpoint outputs/validation/lenet5_mnist.pt

The model was trained without its last 10,000 training images (the validation split). Every
method's threshold is set there, the lowest that flags at most --aim of the validation split's
right answers; the shipped one (doubt: "not sure" or the detector) keeps the thresholds it learned
itself without the validation split. The methods:

- msp: the calibrated top probability (Hendrycks & Gimpel, 2017);
- energy: the logits' log-sum-exp (Liu et al., 2020);
- mahalanobis: the distance of fc2's output to the nearest class mean, under one covariance fitted
  on the training images (Lee et al., 2018);
- detector: companions/doubt/verdicts.py's network, trained on the dataset's images against the made families;
- doubt: what predict and serve say: "not sure" (msp below its threshold) or the detector's "not a digit".

Each family the detector learns from is held out in turn: a detector is trained without it, and
its row says how much of that family the methods flag. Three more kinds are never learned from:
Fashion-MNIST's test images (when in <data-dir>), doodles drawn with the page's pen (a star, a
house, a smiley, an arrow, a heart, a spiral, a sun, lightning, a crossed circle, letters of
lines) and letters in the handwriting fonts of benchmarks/handwriting.py (both prepared by
predict's own code path). The test set is read only
for the share of its right answers that each method flags. Last, how the shipped thresholds' two
aims were chosen: the validation split's right and wrong answers flagged, and the unseen kinds,
for each pair of aims.
"""

import argparse
import io
import math
import sys
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from handwriting import FONTS as HANDWRITING_FONTS  # noqa: E402  (benchmarks/handwriting.py)

import mnist_recognition as app  # noqa: E402
from companions.doubt import non_digits, verdicts  # noqa: E402
from companions.doubt.detector import scores_of, threshold_for, train_detector  # noqa: E402
from companions.training.augment import generator_for  # noqa: E402
from companions.training.dataset_files import has_files  # noqa: E402
from companions.using import prepare  # noqa: E402
from companions.using.trained import doubt_of, load_trained_model  # noqa: E402

# Letters that are digits when written by hand (O, I, l, S, Z, B, b, g, q, G) are left out.
LETTERS = "ACEFHKLMNPRTUVWXYacdefhkmnprtuvwxy"
# Letters of scripts that no family draws, in DejaVu Sans (matplotlib's): Hebrew, Arabic, Armenian,
# Georgian; those that look like a digit (Hebrew vav, samekh; Armenian O, Z-, 3-shaped ones) are left out.
OTHER_SCRIPTS = "אבגדהזחטכלמנעפצקרשתبتثجحخشصضطظعغفقكميԱԲԴԵԷԹԺԻԼԽԾԿՀՂՃՄՆՇՈՊՋՌՎՐՒՓՔՖაბდეთიკლმნპჟრსტუფქღყშჩცძწჭხჯჰ"


# Doodles as polylines in a unit square (None lifts the pen), drawn with the page's 28-px pen on 280x280.
def ray(angle, radius):
    return 0.5 + radius * math.cos(angle), 0.5 + radius * math.sin(angle)


CIRCLE = [(0.5 + 0.45 * math.cos(a), 0.5 + 0.45 * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 40)]
DOODLES = {
    "star": [(0.5 + 0.45 * math.sin(a), 0.5 - 0.45 * math.cos(a)) for a in np.arange(6) * 4 * math.pi / 5],
    "house": [(0.15, 0.95), (0.15, 0.45), (0.5, 0.1), (0.85, 0.45), (0.85, 0.95), (0.15, 0.95), None,
              (0.15, 0.45), (0.85, 0.45)],
    "smiley": [*CIRCLE, None, (0.35, 0.35), (0.36, 0.36), None, (0.65, 0.35), (0.66, 0.36), None,
               *[(0.5 + 0.25 * math.cos(a), 0.55 + 0.2 * math.sin(a)) for a in np.linspace(0.3, math.pi - 0.3, 12)]],
    "arrow": [(0.05, 0.5), (0.95, 0.5), None, (0.65, 0.2), (0.95, 0.5), (0.65, 0.8)],
    "heart": [(0.5, 0.95), (0.1, 0.5), (0.1, 0.25), (0.3, 0.1), (0.5, 0.3), (0.7, 0.1), (0.9, 0.25), (0.9, 0.5),
              (0.5, 0.95)],
    "spiral": [(0.5 + r * math.cos(a), 0.5 + r * math.sin(a))
               for a, r in zip(np.linspace(0, 6 * math.pi, 60), np.linspace(0.02, 0.45, 60))],
    "sun": [*[(0.5 + 0.2 * math.cos(a), 0.5 + 0.2 * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 24)],
            *[p for a in np.arange(8) * math.pi / 4 for p in (None, ray(a, 0.3), ray(a, 0.48))]],
    "lightning": [(0.6, 0.0), (0.3, 0.5), (0.6, 0.5), (0.35, 1.0)],
    "crossed circle": [*CIRCLE, None, (0.2, 0.2), (0.8, 0.8), None, (0.8, 0.2), (0.2, 0.8)],
    "letter A": [(0.1, 0.95), (0.5, 0.05), (0.9, 0.95), None, (0.3, 0.55), (0.7, 0.55)],
    "letter E": [(0.8, 0.05), (0.2, 0.05), (0.2, 0.95), (0.8, 0.95), None, (0.2, 0.5), (0.65, 0.5)],
    "letter H": [(0.2, 0.05), (0.2, 0.95), None, (0.8, 0.05), (0.8, 0.95), None, (0.2, 0.5), (0.8, 0.5)],
    "letter K": [(0.2, 0.05), (0.2, 0.95), None, (0.8, 0.05), (0.2, 0.55), (0.8, 0.95)],
    "letter M": [(0.1, 0.95), (0.15, 0.05), (0.5, 0.6), (0.85, 0.05), (0.9, 0.95)],
    "letter W": [(0.05, 0.05), (0.25, 0.95), (0.5, 0.4), (0.75, 0.95), (0.95, 0.05)],
    "letter X": [(0.1, 0.05), (0.9, 0.95), None, (0.9, 0.05), (0.1, 0.95)],
}  # fmt: skip


# --- the kinds of images that no method learns from -------------------------------------------


def drawn_doodle(strokes, rng):
    """A doodle drawn as a person draws on the page: jittered, turned, squashed, pen 28 px, as PNG."""
    canvas = Image.new("L", (280, 280), 255)
    draw = ImageDraw.Draw(canvas)
    angle, squash = rng.uniform(-0.35, 0.35), rng.uniform(0.75, 1.0)
    for part in split_at_none(strokes):
        points = []
        for x, y in part:
            x, y = (x - 0.5 + rng.normal(0, 0.02)) * squash, y - 0.5 + rng.normal(0, 0.02)
            x, y = x * math.cos(angle) - y * math.sin(angle), x * math.sin(angle) + y * math.cos(angle)
            points.append((140 + 190 * x, 140 + 190 * y))
        draw.line(points, fill=0, width=28, joint="curve")
        for x, y in (points[0], points[-1]):
            draw.ellipse((x - 14, y - 14, x + 14, y + 14), fill=0)
    return canvas


def split_at_none(strokes):
    parts, part = [], []
    for point in [*strokes, None]:
        if point is None:
            parts, part = parts + [part] if part else parts, []
        else:
            part.append(point)
    return parts


def in_font(letter, font, rng):
    canvas = Image.new("L", (300, 300), 255)
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), letter, font=font)
    draw.text(((300 - right - left) / 2, (300 - bottom - top) / 2), letter, fill=0, font=font)
    return canvas.rotate(rng.uniform(-8, 8), resample=Image.Resampling.BILINEAR, fillcolor=255)


def through_predict(images, dataset):
    """The network inputs that predict's code path makes of these images, saved as PNG first."""
    inputs = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        buffer.seek(0)
        inputs.append(prepare.read_image(buffer, dataset)[1])
    return torch.stack(inputs)


def unseen_kinds(data_dir, dataset, count):
    """{kind: normalised network inputs} of the kinds that no method learns from: the test images of
    the other dataset (Fashion-MNIST for a digit model, MNIST for a clothing one), doodles, letters."""
    rng = np.random.default_rng(0)
    kinds = {}
    other = app.DATASETS["fashion-mnist" if dataset.image_kind == "digit" else "mnist"]
    if has_files(data_dir, other, ("t10k-images-idx3-ubyte",)):
        pixels, _ = app.pixel_split(data_dir, other, False, count)
        kinds[other.title] = non_digits.prepared(pixels, dataset.image_kind).sub(dataset.mean).div(dataset.std)
    else:
        print(f"left out: {other.title}'s test images are not in {data_dir}")
    names = list(DOODLES)
    doodles = [drawn_doodle(DOODLES[names[i % len(names)]], rng) for i in range(count)]
    kinds["doodles (page's pen)"] = through_predict(doodles, dataset)
    fonts = [path for path in HANDWRITING_FONTS if Path(path).is_file()]
    for path in sorted(set(HANDWRITING_FONTS) - set(fonts)):
        print(f"left out, not installed: {path}")
    if fonts:
        letters = [
            in_font(
                LETTERS[i % len(LETTERS)], ImageFont.truetype(fonts[i % len(fonts)], int(rng.integers(90, 170))), rng
            )
            for i in range(count)
        ]
        kinds[f"handwritten letters ({len(fonts)} fonts)"] = through_predict(letters, dataset)
    script_font = str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf")
    scripts = [
        in_font(OTHER_SCRIPTS[i % len(OTHER_SCRIPTS)], ImageFont.truetype(script_font, int(rng.integers(90, 170))), rng)
        for i in range(count)
    ]
    kinds["other scripts' letters"] = through_predict(scripts, dataset)
    return kinds


# --- the methods' scores: higher is less like a digit ----------------------------------------


@torch.inference_mode()
def fc2_features(model, images):
    """fc2's output (after its activation): the last layer's input."""
    seen = []
    hook = model.classifier[-1].register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    verdicts.logits_of(model, images)
    hook.remove()
    return torch.cat(seen).float().cpu()


def mahalanobis_scorer(model, images, labels):
    features, labels = fc2_features(model, images), labels.cpu()
    means = torch.stack([features[labels == k].mean(0) for k in range(10)])
    centred = features - means[labels]
    precision = torch.linalg.pinv(centred.T @ centred / len(features))

    def score(inputs):
        difference = fc2_features(model, inputs).unsqueeze(1) - means  # N x 10 x D
        return torch.einsum("nkd,de,nke->nk", difference, precision, difference).min(1).values

    return score


def scorers(model, learned, train_set):
    return {
        "msp": lambda x: -F.softmax(verdicts.logits_of(model, x) / learned.temperature, 1).max(1).values,
        "energy": lambda x: -torch.logsumexp(verdicts.logits_of(model, x), 1),
        "mahalanobis": mahalanobis_scorer(model, *train_set),
        "detector": lambda x: scores_of(learned.detector, x),
    }


def shipped_flags(model, learned, inputs):
    logits = verdicts.logits_of(model, inputs)
    return learned.verdicts(logits, inputs)[2] != 0


def threshold_at(scores, aim):
    """The score above which at most `aim` of these scores lie."""
    return scores.sort(descending=True).values[int(aim * len(scores))].item()


def auroc_and_fpr95(inside, outside):
    """(AUROC, FPR at 95 % TPR) in percent, outliers as positives (higher scores: less like the dataset),
    as Outlier Exposure and OpenOOD report them: AUROC as the Mann-Whitney U statistic, ties counted half."""
    from scipy.stats import mannwhitneyu

    outside, inside = outside.double().numpy(), inside.double().numpy()
    auroc = mannwhitneyu(outside, inside).statistic / (len(outside) * len(inside))
    caught_95 = np.sort(outside)[int(np.floor(0.05 * len(outside)))]  # 95 % of the outliers score at least this
    return 100 * auroc, 100 * np.mean(inside >= caught_95)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a model trained with --validation 10000")
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parent.parent / "data")
    parser.add_argument("--count", type=int, default=1000, help="images of each family and kind")
    parser.add_argument("--aim", type=float, default=0.01, help="the share of right validation answers flagged")
    parser.add_argument("--no-held-out", action="store_true", help="skip training a detector without each family")
    args = parser.parse_args()

    device = torch.device("cpu")
    model, payload = load_trained_model(args.checkpoint, device)
    held_out = payload.get("config", {}).get("validation", 0)
    if not held_out:
        sys.exit(f"{args.checkpoint} was not trained with --validation N: its held-out images are unknown")
    learned = doubt_of(payload, args.checkpoint, device)
    if learned.detector is None:
        sys.exit(f"{args.checkpoint} has no 'not a digit' detector: train it without --no-detector")
    dataset = app.DATASETS[payload["config"]["dataset"]]
    images, labels = app.normalised_split(args.data_dir, dataset, True, None, device)
    train_set, validation = (images[:-held_out], labels[:-held_out]), (images[-held_out:], labels[-held_out:])
    test = app.normalised_split(args.data_dir, dataset, False, None, device)

    def right_only(split):
        return split[0][verdicts.logits_of(model, split[0]).argmax(1) == split[1]]

    validation_right, test_right = right_only(validation), right_only(test)
    digits = (train_set[0][:10_000] * dataset.std + dataset.mean, train_set[1][:10_000])
    generator = generator_for("benchmark families")  # not the detector's: other images of the same families
    families = {
        name: non_digits.make([name], args.count, generator, digits, dataset.image_kind)
        .sub(dataset.mean)
        .div(dataset.std)
        for name in non_digits.families_for(dataset.image_kind)
    }
    unseen = unseen_kinds(args.data_dir, dataset, args.count)

    print(f"{args.checkpoint}: thresholds flag {args.aim:.1%} of the validation split's right answers")
    header = ["", "test right flagged", *families, *unseen, "unseen kinds (mean)"]
    rows, areas = {}, {}
    for name, score in scorers(model, learned, train_set).items():
        threshold = threshold_at(score(validation_right), args.aim)
        rows[name] = [flagged_share(score(x) > threshold) for x in (test_right, *families.values(), *unseen.values())]
        inside = score(test[0])
        areas[name] = [auroc_and_fpr95(inside, score(x)) for x in unseen.values()]
    rows["doubt (shipped)"] = [
        flagged_share(shipped_flags(model, learned, x)) for x in (test_right, *families.values(), *unseen.values())
    ]
    # Each family held out in turn: the detector and the shipped verdicts without it.
    held_out_rows = {"detector": [], "doubt (shipped)": []}
    for name, images_of_family in families.items() if not args.no_held_out else ():
        others = [other for other in families if other != name]
        network, scores = train_detector(images, labels, dataset, families=others)
        without = verdicts.Doubt(learned.temperature, learned.unsure_below, network, threshold_for(scores))
        threshold = threshold_at(scores_of(network, validation_right), args.aim)
        held_out_rows["detector"].append(flagged_share(scores_of(network, images_of_family) > threshold))
        held_out_rows["doubt (shipped)"].append(flagged_share(shipped_flags(model, without, images_of_family)))
        print(f"held out {name}: {held_out_rows['detector'][-1]:.1f} / {held_out_rows['doubt (shipped)'][-1]:.1f}")
    print_table(header, rows, len(families), held_out_rows)
    print_areas(list(unseen), areas)
    print_aims(model, learned, validation, unseen)


def print_areas(kinds, areas):
    """AUROC and FPR95 of each score on each unseen kind against the whole test set, and their means."""
    print("\n| score | " + " | ".join(kinds) + " | mean |")
    print("|---" * (len(kinds) + 2) + "|")
    for name, values in areas.items():
        cells = [f"{auroc:.1f} / {fpr:.1f}" for auroc, fpr in values]
        means = np.mean(values, 0)
        print(f"| {name} | " + " | ".join(cells) + f" | **{means[0]:.1f} / {means[1]:.1f}** |")
    print("Each cell: AUROC / FPR at 95 % of the outliers caught, in percent (outliers as positives, the test")
    print("set as the dataset's images; AUROC higher is better, FPR95 lower).")


AIMS = {"unsure": (0.003, 0.005, 0.01, 0.02, 0.03), "detector": (0.005, 0.0075, 0.01)}


def print_aims(model, learned, validation, unseen):
    """How the two aims that set the shipped thresholds were chosen: for each pair, the shares of the
    validation split's right and wrong answers flagged, and of the unseen kinds. The "not sure"
    threshold is set here on the validation split's right answers, the detector's on its held-out
    images (the same split)."""
    held_out_scores = scores_of(learned.detector, validation[0])
    inputs = {"validation": validation[0], **unseen}
    confidence = {
        name: F.softmax(verdicts.logits_of(model, x) / learned.temperature, 1).max(1).values
        for name, x in inputs.items()
    }
    scores = {name: scores_of(learned.detector, x) for name, x in inputs.items()}
    right = verdicts.logits_of(model, validation[0]).argmax(1) == validation[1]
    calibration = F.softmax(verdicts.logits_of(model, validation[0]) / learned.temperature, 1)
    print("\n| 'not sure' aim | detector aim | validation: right flagged | wrong flagged | unseen kinds (mean) |")
    print("|---|---|---|---|---|")
    for unsure_aim in AIMS["unsure"]:
        unsure_below = verdicts.unsure_threshold(calibration, validation[1], unsure_aim)
        for detector_aim in AIMS["detector"]:
            above = threshold_for(held_out_scores, detector_aim)
            flags = {name: (confidence[name] < unsure_below) | (scores[name] > above) for name in inputs}
            unseen_mean = np.mean([flagged_share(flags[name]) for name in unseen])
            print(
                f"| {unsure_aim:.1%} | {detector_aim:.2%} | {flagged_share(flags['validation'][right]):.2f} | "
                f"{flagged_share(flags['validation'][~right]):.1f} | {unseen_mean:.1f} |"
            )


def flagged_share(flags):
    return 100 * flags.float().mean().item()


def print_table(header, rows, family_count, held_out_rows):
    print("| method | " + " | ".join(header[1:]) + " |")
    print("|---" * len(header) + "|")
    for name, values in rows.items():
        unseen = values[1 + family_count :]
        cells = [f"{value:.1f}" for value in values] + [f"**{np.mean(unseen):.1f}**"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    for name, values in held_out_rows.items():
        cells = ["", *[f"{value:.1f}" for value in values]] + [""] * (len(header) - 2 - family_count)
        print(f"| {name}, each family held out | " + " | ".join(cells) + f" (mean {np.mean(values):.1f}) |")
    print("Flagged: the percentage of each kind's images called 'not sure' or 'not a digit' (higher is better,")
    print("but for the test set's right answers, where lower is better).")


if __name__ == "__main__":
    main()
