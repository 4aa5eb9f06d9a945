#!/usr/bin/env python3
"""How well whole numbers are read: numbers of 2 to 6 handwritten digits, photographed on uneven paper.

    python benchmarks/whole_numbers.py --checkpoints outputs/lenet5_mnist.pt [more.pt ...]
    python benchmarks/whole_numbers.py --split validation     # the numbers the segmentation's settings were chosen on
    python benchmarks/whole_numbers.py --split validation --set CUTS=8 PART_COST=2   # other settings, on those

Each number is made of MNIST test digits (handwriting the model never trained on: the test set's
second half; `--split validation` takes its first half, on which companions/using/numbers.py's
settings were chosen), each digit's ink scaled to one height for the number, set on a baseline with
a little jitter, then the whole photographed as benchmarks/handwriting.py photographs one digit: dark
ink on light paper lit unevenly, blurred, noisy, a JPEG file. Three kinds:

- clear gaps: a quarter to four fifths of a digit's height between digits;
- close: a twentieth to a seventh of a digit's height;
- touching: as close, but one pair of neighbours (at least) moved together until their ink touches;
- fonts: numbers typed in the handwriting fonts of benchmarks/handwriting.py that are installed,
  as the font spaces them, photographed the same way: a kind the settings were not chosen on.

Every file is read through predict's own code path (companions.using.predict.read_number). Beside
each kind's share of whole numbers read right is its ceiling: the same digits photographed one per
image and read one at a time, a number counted right where all its digits are. Then the time to
answer a photographed six-digit number and a one-digit one (median of repeated runs, side by side):
predict's read of an image file, and serve's POST /predict on 127.0.0.1. The anchors:

- Hochuli et al. 2021 (an end-to-end detector, YOLO-style): about 97 % of strings on NIST SD19, 84 %
  on CVL HDS;
- the segment-then-read approach of OpenCV's digits sample (contours, one box each): it reads a
  number right only where no two digits touch.
"""

import argparse
import http.client
import io
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import handwriting  # noqa: E402

import mnist_recognition as app  # noqa: E402
from companions.using import numbers as numbers_module  # noqa: E402
from companions.using import predict, prepare, serve, trained  # noqa: E402

KINDS = ("clear gaps", "close", "touching", "fonts")
GAPS = {"clear gaps": (0.25, 0.8), "close": (0.05, 0.15), "touching": (0.05, 0.15)}  # of a digit's height
ANCHORS = (
    "Hochuli et al. 2021, an end-to-end detector: about 97 % of strings on NIST SD19, 84 % on CVL HDS",
    "OpenCV's digits sample (segment, then read each box): right only where no two digits touch",
)


# ----------------------------------------------------------------------------------------------
# Making the numbers
# ----------------------------------------------------------------------------------------------


def digit_ink(digit, height):
    """An MNIST digit's ink (0..1), cropped to it and scaled so that a 20-px digit is `height` px tall."""
    rows, cols = np.flatnonzero(digit.max(1) > 0), np.flatnonzero(digit.max(0) > 0)
    crop = Image.fromarray(digit[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
    scale = height / 20
    size = (max(1, round(crop.width * scale)), max(1, round(crop.height * scale)))
    return np.asarray(crop.resize(size, Image.Resampling.BICUBIC), dtype=np.float32) / 255


def touching_offset(canvas, ink, left, top):
    """The column at which `ink`, moved leftwards from `left`, first touches the canvas's ink."""
    height, width = ink.shape
    for x in range(left, max(left - width, 0), -1):
        region = canvas[top : top + height, x : x + width]
        if np.any((region > 0.3) & (ink[:, : region.shape[1]] > 0.3)):
            return x
    return left


def composed(digits, kind, rng, height):
    """The number's ink (0..1) on a blank strip: each digit `height` px tall (a 20-px MNIST digit),
    side by side; where touching, one pair at least, and each other pair with a chance of a third."""
    inks = [digit_ink(digit, height) for digit in digits]
    touching = {int(rng.integers(1, len(digits)))} if len(digits) > 1 else set()
    touching |= {i for i in range(1, len(digits)) if rng.random() < 1 / 3}
    low, high = GAPS[kind]
    canvas = np.zeros((height * 2, sum(ink.shape[1] for ink in inks) + 2 * height * len(inks)), np.float32)
    x = height // 2
    for i, ink in enumerate(inks):
        top = height // 2 + (height - ink.shape[0]) // 2 + int(rng.normal(0, 0.04 * height))
        if i:
            x += int(rng.uniform(low, high) * height)
            if kind == "touching" and i in touching:
                x = touching_offset(canvas, ink, x, top) - int(rng.integers(1, 1 + height // 25))
        region = canvas[top : top + ink.shape[0], x : x + ink.shape[1]]
        np.maximum(region, ink, out=region)
        x += ink.shape[1]
    rows, cols = np.flatnonzero(canvas.max(1) > 0), np.flatnonzero(canvas.max(0) > 0)
    return canvas[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def photographed(ink, rng):
    """Ink photographed on uneven paper, a little tilted, blurred and noisy, as a JPEG file."""
    page = handwriting.on_paper(ink, rng, page_margin=80)
    photo = Image.fromarray(np.clip(page, 0, 255).astype(np.uint8))
    photo = photo.rotate(rng.uniform(-2, 2), resample=Image.Resampling.BILINEAR, fillcolor=int(np.median(page)))
    photo = photo.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    noisy = np.asarray(photo, dtype=np.float32) + rng.normal(0, rng.uniform(2, 6), size=(photo.height, photo.width))
    return handwriting.encoded(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)), "JPEG")


def typed(text, font_path, height):
    """Text in a font as ink (0..1), its digits `height` px tall, cropped to the ink."""
    font = ImageFont.truetype(font_path, size=int(1.4 * height))
    canvas = Image.new("L", (int(1.4 * height) * (len(text) + 2), 3 * height), 0)
    ImageDraw.Draw(canvas).text((height // 2, height // 2), text, fill=255, font=font)
    ink = np.asarray(canvas, dtype=np.float32) / 255
    rows, cols = np.flatnonzero(ink.max(1) > 0), np.flatnonzero(ink.max(0) > 0)
    return ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def numbers_of(kind, count, pool, rng):
    """[(the number's file, its digits' files one per image, the number as a string)] x count."""
    if kind == "fonts":
        return typed_numbers(count, rng)
    images, labels = pool
    made = []
    for _ in range(count):
        chosen = rng.choice(len(labels), size=int(rng.integers(2, 7)), replace=False)
        digits = [images[i] for i in chosen]
        truth = "".join(str(labels[i]) for i in chosen)
        height = int(rng.integers(50, 110))
        number = photographed(composed(digits, kind, rng, height), rng)
        alone = [photographed(composed([digit], kind, rng, height), rng) for digit in digits]
        made.append((number, alone, truth))
    return made


def typed_numbers(count, rng):
    """Numbers typed in one of the handwriting fonts that are installed, photographed as the others."""
    fonts = [font for font in handwriting.FONTS if Path(font).is_file()]
    made = []
    for _ in range(count if fonts else 0):
        truth = "".join(str(digit) for digit in rng.integers(0, 10, size=int(rng.integers(2, 7))))
        font, height = fonts[int(rng.integers(len(fonts)))], int(rng.integers(50, 110))
        number = photographed(typed(truth, font, height), rng)
        made.append((number, [photographed(typed(digit, font, height), rng) for digit in truth], truth))
    return made


def pool_of(data_dir, split):
    """(MNIST test images as numpy arrays, their labels): the first half (validation) or the second."""
    images, labels = app.raw_split(data_dir, app.DATASETS["mnist"], train=False)
    half = len(labels) // 2
    chosen = slice(0, half) if split == "validation" else slice(half, None)
    return images[chosen].numpy(), labels[chosen].tolist()


# ----------------------------------------------------------------------------------------------
# Reading them
# ----------------------------------------------------------------------------------------------


def read(reader, file):
    """The number read from one image file, as predict reads it; None where it finds no ink (a faint
    photo of a thin stroke can lie within the paper's grain)."""
    model, learned, dataset = reader
    gray = prepare.open_grayscale(io.BytesIO(file))
    try:
        return predict.read_number(model, learned, gray, torch.device("cpu"), dataset)[0]["number"]
    except prepare.NoInk:
        return None


def shares(reader, made):
    """(numbers read right, their digits read right one at a time (all right), digits read right one at a time), %."""
    whole = [read(reader, number) == truth for number, _, truth in made]
    alone = [[read(reader, file) == digit for file, digit in zip(files, truth)] for _, files, truth in made]
    return 100 * np.mean(whole), 100 * np.mean([all(each) for each in alone]), 100 * np.mean(sum(alone, []))


def median_time(answer, file, repeats):
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        answer(file)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def served(reader, checkpoint):
    """A serve on a free port of 127.0.0.1, in this process; (the server, its port)."""
    model, learned, dataset = reader
    page = serve.page_for(str(checkpoint), dataset)
    server = serve.DigitServer(("127.0.0.1", 0), model, learned, torch.device("cpu"), dataset, page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def post(port, file, layers):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("POST", "/predict" + ("?layers=1" if layers else ""), body=file)
    response = connection.getresponse()
    response.read()
    connection.close()
    assert response.status == 200, response.status


def times(reader, checkpoint, rng, pool, repeats):
    """{what: (one digit's median seconds, a six-digit number's)}, measured side by side."""
    images, _ = pool
    six = photographed(composed([images[i] for i in range(6)], "clear gaps", rng, 80), rng)
    one = photographed(composed([images[0]], "clear gaps", rng, 80), rng)
    server, port = served(reader, checkpoint)
    answers = {
        "predict": lambda file: read(reader, file),
        "serve": lambda file: post(port, file, False),
        "serve ?layers=1 (the page)": lambda file: post(port, file, True),
    }
    try:
        return {what: (median_time(f, one, repeats), median_time(f, six, repeats)) for what, f in answers.items()}
    finally:
        server.shutdown()
        server.server_close()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=Path, nargs="+", default=[Path("outputs") / app.MODEL_FILE])
    parser.add_argument("--count", type=int, default=300, help="numbers per kind")
    parser.add_argument("--split", choices=("benchmark", "validation"), default="benchmark")
    parser.add_argument("--repeats", type=int, default=30, help="times each image is answered for its median time")
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parent.parent / "data")
    parser.add_argument(
        "--set", nargs="+", default=[], metavar="NAME=VALUE", help="try another setting of companions/using/numbers.py"
    )
    args = parser.parse_args()
    for name, value in (setting.split("=", 1) for setting in args.set):
        setattr(numbers_module, name, type(getattr(numbers_module, name))(value))

    torch.set_num_threads(2)
    pool = pool_of(args.data_dir, args.split)
    made = {kind: numbers_of(kind, args.count, pool, np.random.default_rng(index)) for index, kind in enumerate(KINDS)}
    print(f"{args.count} numbers of 2-6 digits per kind, MNIST test digits ({args.split} half), photographed")
    for checkpoint in args.checkpoints:
        model, payload, dataset = *trained.load_trained_model(checkpoint, torch.device("cpu")), app.DATASETS["mnist"]
        reader = (model, trained.doubt_of(payload, checkpoint, torch.device("cpu")), dataset)
        print(f"\n{serve.describe_model(checkpoint, payload, dataset)}")
        print(f"{'kind':<12} {'numbers right':>14} {'ceiling: one at a time':>23} {'below it':>9} {'digits alone':>13}")
        for kind, numbers in made.items():
            if not numbers:
                print(f"{kind:<12} none: no handwriting font of benchmarks/handwriting.py is installed")
                continue
            whole, ceiling, digits = shares(reader, numbers)
            print(f"{kind:<12} {whole:>13.1f}% {ceiling:>22.1f}% {ceiling - whole:>8.1f}  {digits:>12.1f}%", flush=True)
        if args.repeats:
            print(f"\n{'answer':<28} {'one digit':>10} {'six digits':>11} {'ratio':>6}  (medians of {args.repeats})")
            for what, (one, six) in times(reader, checkpoint, np.random.default_rng(9), pool, args.repeats).items():
                print(f"{what:<28} {1000 * one:>8.1f}ms {1000 * six:>9.1f}ms {six / one:>5.2f}x", flush=True)
    print("\nAnchors:\n" + "\n".join(f"- {anchor}" for anchor in ANCHORS))


if __name__ == "__main__":
    main()
