#!/usr/bin/env python3
"""How well a model reads digits that never went through MNIST's own preparation.

    python benchmarks/handwriting.py --checkpoints outputs/lenet5_mnist.pt [more.pt ...]

Every image is made here from scratch, encoded as a file would be (PNG or JPEG), and read through
predict's own code path (`companions.using.prepare.read_image`: open, grayscale, foreground, stroke width, 20-px box,
centre of mass, normalisation); the model then answers for all of them at once. Each kind is read
four times, side by side: with the simplest preparation ("before": the border's
median as the background level, strokes as they are), with the background's light fitted as a
plane ("+ light"), with the paper's grain taken away too ("+ grain"), and with stroke widths
handled too ("now", the current preparation). Then, for each kind with today's preparation, the
shares of the wrong answers and of the right ones that the model's verdicts flag ("not sure" or
"not a digit"; companions/doubt/verdicts.py). The kinds:

- drawn (thin, MNIST-like, heavy pen): MNIST test digits re-drawn as a person draws on the page:
  the digit's skeleton traced with a round pen 10, 28 or 56 px wide on a 280x280 canvas;
- photographed: MNIST test digits enlarged (120-300 px), dark ink on light paper, rotated by up to
  8 degrees, placed off-centre on a larger page, blurred, lit unevenly, with noise, as JPEG;
- heavy scan: MNIST test digits with strokes about twice as wide, blurred, through a low-resolution
  scanner (40 px, then enlarged without smoothing), dark on light, as JPEG;
- fonts: the ten digits in handwriting-style fonts from Debian's packages (fonts-humor-sans,
  fonts-dkg-handwriting, fonts-femkeklaver, fonts-breip, fonts-rufscript, fonts-dancingscript), in
  random sizes and slants; fonts not installed are named and left out.

The MNIST digits are a fixed random choice (seed 0) from the test set in <data-dir>/MNIST/raw/.
"""

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mnist_recognition as app  # noqa: E402
from companions.doubt import verdicts  # noqa: E402
from companions.using import prepare, trained  # noqa: E402
from companions.using.serve import describe_model  # noqa: E402

FONTS = [
    "/usr/share/fonts/truetype/humor-sans/Humor-Sans.ttf",
    "/usr/share/fonts/truetype/fifthhorseman/dkg.ttf",
    "/usr/share/fonts/truetype/femkeklaver/femkeklaver.ttf",
    "/usr/share/fonts/truetype/breip/Breip.ttf",
    "/usr/share/fonts/truetype/rufscript/Rufscript010.ttf",
    "/usr/share/fonts/opentype/dancingscript/DancingScript-Regular.otf",
]
PENS = {"drawn, thin pen (10 px)": 10, "drawn, MNIST-like pen (28 px)": 28, "drawn, heavy pen (56 px)": 56}


# --- making the images ---------------------------------------------------------------------------


def thinned(binary):
    """The skeleton of a binary image, one pixel wide (Zhang and Suen's thinning, 1984)."""
    image = binary.astype(np.uint8)
    while True:
        changed = False
        for step in (0, 1):
            p = np.pad(image, 1)
            # The eight neighbours, clockwise from the one above.
            n = [p[:-2, 1:-1], p[:-2, 2:], p[1:-1, 2:], p[2:, 2:], p[2:, 1:-1], p[2:, :-2], p[1:-1, :-2], p[:-2, :-2]]
            count = sum(n)
            transitions = sum((n[i] == 0) & (n[(i + 1) % 8] == 1) for i in range(8))
            if step == 0:
                side = (n[0] * n[2] * n[4] == 0) & (n[2] * n[4] * n[6] == 0)
            else:
                side = (n[0] * n[2] * n[6] == 0) & (n[0] * n[4] * n[6] == 0)
            remove = (image == 1) & (count >= 2) & (count <= 6) & (transitions == 1) & side
            if remove.any():
                image[remove] = 0
                changed = True
        if not changed:
            return image


def drawn(digit, pen):
    """The digit's skeleton traced with a round pen `pen` px wide, dark on a white 280x280 canvas."""
    large = np.asarray(Image.fromarray(digit).resize((56, 56), Image.Resampling.BILINEAR)) > 127
    skeleton = thinned(large)
    canvas = Image.new("L", (280, 280), 255)
    draw = ImageDraw.Draw(canvas)
    rows, cols = np.nonzero(skeleton)
    points = {(row, col) for row, col in zip(rows, cols)}
    for row, col in points:
        x, y = col * 5 + 2.5, row * 5 + 2.5
        draw.ellipse((x - pen / 2, y - pen / 2, x + pen / 2, y + pen / 2), fill=0)
        for d_row, d_col in ((0, 1), (1, 0), (1, 1), (1, -1)):
            if (row + d_row, col + d_col) in points:
                draw.line((x, y, x + 5 * d_col, y + 5 * d_row), fill=0, width=pen)
    return canvas, "PNG"


def on_paper(ink, rng, page_margin):
    """0..1 ink as dark ink on light paper, off-centre on a larger page, unevenly lit, with noise."""
    height, width = ink.shape
    left, top = rng.integers(10, page_margin, size=2)
    page_width, page_height = width + left + rng.integers(10, page_margin), height + top + rng.integers(10, page_margin)
    paper, ink_level = rng.uniform(170, 235), rng.uniform(30, 90)
    page = np.full((page_height, page_width), paper, dtype=np.float32)
    page[top : top + height, left : left + width] -= (paper - ink_level) * ink
    light = (
        rng.uniform(-25, 25) * np.linspace(-1, 1, page_width)[None, :]
        + rng.uniform(-15, 15) * np.linspace(-1, 1, page_height)[:, None]
    )
    return page + light


def photographed(digit, rng):
    """The digit enlarged, rotated a little, as dark ink photographed on paper: blurred, noisy, JPEG."""
    size = int(rng.integers(120, 300))
    large = Image.fromarray(digit).resize((size, size), Image.Resampling.BICUBIC)
    large = large.rotate(rng.uniform(-8, 8), resample=Image.Resampling.BILINEAR)
    page = on_paper(np.asarray(large, dtype=np.float32) / 255, rng, page_margin=160)
    photo = Image.fromarray(np.clip(page, 0, 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(rng.uniform(0.5, 2.5))
    )
    noisy = np.asarray(photo, dtype=np.float32) + rng.normal(0, rng.uniform(2, 8), size=page.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)), "JPEG"


def heavy_scan(digit, rng):
    """The digit with strokes about twice as wide, blurred, scanned at a low resolution, as JPEG."""
    large = Image.fromarray(digit).resize((56, 56), Image.Resampling.BILINEAR)
    for _ in range(int(rng.integers(2, 4))):
        large = large.filter(ImageFilter.MaxFilter(3))
    scanned = large.filter(ImageFilter.GaussianBlur(1)).resize((40, 40), Image.Resampling.BILINEAR)
    enlarged = scanned.resize((160, 160), Image.Resampling.NEAREST)  # a low-resolution scan, shown large
    page = on_paper(np.asarray(enlarged, dtype=np.float32) / 255, rng, page_margin=40)
    return Image.fromarray(np.clip(page + rng.normal(0, 3, size=page.shape), 0, 255).astype(np.uint8)), "JPEG"


def in_font(font_path, digit, rng):
    """The digit in a font, in a random size and slant, dark on white."""
    font = ImageFont.truetype(font_path, size=int(rng.integers(90, 170)))
    canvas = Image.new("L", (300, 300), 255)
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), str(digit), font=font)
    draw.text(((300 - right - left) / 2, (300 - bottom - top) / 2), str(digit), fill=0, font=font)
    return canvas.rotate(rng.uniform(-8, 8), resample=Image.Resampling.BILINEAR, fillcolor=255), "PNG"


def encoded(image, image_format):
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **({"quality": 80} if image_format == "JPEG" else {}))
    return buffer.getvalue()


def kinds_of_images(data_dir, count):
    """{kind: (list of encoded image files, labels)}."""
    images, labels = app.raw_split(data_dir, app.DATASETS["mnist"], train=False)
    chosen = np.random.default_rng(0).choice(len(labels), count, replace=False)
    digits, truths = [images[i].numpy() for i in chosen], [int(labels[i]) for i in chosen]
    rng = np.random.default_rng(1)
    kinds = {name: ([encoded(*drawn(digit, pen)) for digit in digits], truths) for name, pen in PENS.items()}
    kinds["photographed"] = ([encoded(*photographed(digit, rng)) for digit in digits], truths)
    kinds["heavy scan"] = ([encoded(*heavy_scan(digit, rng)) for digit in digits], truths)
    fonts = [path for path in FONTS if Path(path).is_file()]
    for path in sorted(set(FONTS) - set(fonts)):
        print(f"left out, not installed: {path}")
    if fonts:
        per_font = max(1, count // (10 * len(fonts)))
        font_labels = [digit for _ in fonts for digit in range(10) for _ in range(per_font)]
        font_files = [
            encoded(*in_font(path, digit, rng)) for path in fonts for digit in range(10) for _ in range(per_font)
        ]
        kinds[f"fonts ({len(fonts)})"] = (font_files, font_labels)
    return kinds


# --- reading them --------------------------------------------------------------------------------

# The preparation's steps, added one by one, left to right: (column, its steps).
STEPS = [
    ("before", prepare.Steps(light="median", grain_floor=0, match_strokes=False)),
    ("+ light", prepare.Steps(light="plane", grain_floor=0, match_strokes=False)),
    ("+ grain", prepare.Steps(light="plane", grain_floor=prepare.GRAIN_FLOOR, match_strokes=False)),
    ("now", prepare.STEPS),
]


def read_right(model, files, labels, dataset, steps):
    """For each file, whether the model reads it right, each read through predict's own code path."""
    inputs = torch.stack([prepare.read_image(io.BytesIO(file), dataset, steps)[1] for file in files])
    with torch.inference_mode():
        answers = torch.cat([model(batch).argmax(1) for batch in inputs.split(app.EVAL_BATCH_SIZE)])
    return answers == torch.tensor(labels)


def percent(right):
    return 100 * right.float().mean().item()


def flagged(model, learned, files, labels, dataset):
    """(the share of wrong answers, the share of right answers) that the model's verdicts flag ("not
    sure" or "not a digit"), read through predict's own code path."""
    inputs = torch.stack([prepare.read_image(io.BytesIO(file), dataset)[1] for file in files])
    logits = verdicts.logits_of(model, inputs)
    _, _, codes = learned.verdicts(logits, inputs)
    right, flags = logits.argmax(1) == torch.tensor(labels), codes != 0
    return percent(flags[~right]) if (~right).any() else float("nan"), percent(flags[right])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=Path, nargs="+", default=[Path("outputs") / app.MODEL_FILE])
    parser.add_argument("--count", type=int, default=1000, help="MNIST test digits per kind (fonts: about as many)")
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parent.parent / "data")
    args = parser.parse_args()

    torch.set_num_threads(2)
    kinds = kinds_of_images(args.data_dir, args.count)
    mnist = app.DATASETS["mnist"]
    right_now = {kind: [] for kind in kinds}  # per kind, each model's answers with today's preparation
    for checkpoint in args.checkpoints:
        model, payload = trained.load_trained_model(checkpoint, torch.device("cpu"))
        print(f"\n{describe_model(checkpoint, payload, mnist)}")
        print(f"{'kind':<32} {'images':>6}" + "".join(f" {column:>8}" for column, _ in STEPS))
        for kind, (files, labels) in kinds.items():
            rights = [read_right(model, files, labels, mnist, steps) for _, steps in STEPS]
            right_now[kind].append(rights[-1])
            print(f"{kind:<32} {len(files):>6}" + "".join(f" {percent(right):>7.1f}%" for right in rights), flush=True)
        learned = trained.doubt_of(payload, checkpoint, torch.device("cpu"))
        print(f"\n{'kind (now)':<32} {'wrong answers flagged':>22} {'right answers flagged':>22}")
        for kind, (files, labels) in kinds.items():
            wrong_flagged, right_flagged = flagged(model, learned, files, labels, mnist)
            print(f"{kind:<32} {wrong_flagged:>21.1f}% {right_flagged:>21.1f}%", flush=True)
    if len(args.checkpoints) > 1:
        # Images that no model reads right are often no longer the digit they were made from (a
        # skeleton broken into dots, a loop filled in): an estimate of how far a kind can go.
        print(f"\n{'kind':<32} read right by none of the {len(args.checkpoints)} models")
        for kind, rights in right_now.items():
            print(f"{kind:<32} {100 - percent(torch.stack(rights).any(0)):>7.1f}%")


if __name__ == "__main__":
    main()
