#!/usr/bin/env python3
"""The wall time of whole commands, as `time` shows it, from starting the process to its exit.

    python benchmarks/wall_time.py --runs 5
    python benchmarks/wall_time.py --runs 5 --baseline HEAD~1     # side by side with another commit
    python benchmarks/wall_time.py --runs 3 --baseline HEAD~1 --original   # and the default recipe's run

Cases: `--help`; `--recipe fast` (training, with every output written), and the same with
`--no-detector` (this tree only: the ratio says what the kept "not a digit" detector costs a run;
the set-up run before the rounds learns it, if the data folder has none yet); with --original, the
default recipe's whole run too; `evaluate` on the test set; `predict` on one photo-like image; and
a bare `python -c "import torch"`, the floor of every command. Each round runs every case once, in
an order that rotates from round to round; with --baseline, that commit's tree (taken with `git
archive` into a scratch folder) runs each case in the same rounds. Printed: the median of each
case, `fast`'s median breakdown (from its metrics.json timeline) and its wall time over its own
training seconds, predict and evaluate over the bare import, and with --baseline each median's
ratio. The data must be in <data-dir>/MNIST/raw/.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

REPO = Path(__file__).resolve().parent.parent


def photo_of_a_digit(path):
    """A digit drawn with Pillow's default font, enlarged, dark on light paper, blurred: a phone photo."""
    image = Image.new("L", (28, 28), 0)
    ImageDraw.Draw(image).text((9, 6), "7", fill=255)
    image = image.resize((280, 280), Image.Resampling.BICUBIC)
    paper = 230 - np.asarray(image, dtype=np.float32) * 0.8
    Image.fromarray(paper.astype(np.uint8)).filter(ImageFilter.GaussianBlur(2)).save(path, quality=85)


def cases(script, version, work, data_dir, original=False):
    checkpoint = work / "fast" / "lenet5_mnist.pt"
    data = ["--data-dir", data_dir, "--no-download"]
    default_recipe = {"train (original recipe)": [script, *data, "--out-dir", work / f"original-{version}"]}
    return {
        "--help": [script, "--help"],
        "train --recipe fast": [script, "--recipe", "fast", *data, "--out-dir", work / f"train-{version}"],
        "fast --no-detector": [
            script,
            "--recipe",
            "fast",
            "--no-detector",
            *data,
            "--out-dir",
            work / f"bare-{version}",
        ],
        **(default_recipe if original else {}),
        "evaluate (10,000 images)": [
            script,
            "evaluate",
            "--checkpoint",
            checkpoint,
            *data,
            "--out-dir",
            work / f"evaluate-{version}",
        ],
        "predict (one image)": [script, "predict", work / "digit.jpg", "--checkpoint", checkpoint],
        "python -c 'import torch'": ["-c", "import torch"],
    }


THIS_TREE_ONLY = ("python -c 'import torch'", "fast --no-detector")  # the floor, and what the detector costs


def run(command):
    """(wall seconds, the time.time() it started and ended at)."""
    started, clock = time.time(), time.perf_counter()
    subprocess.run(
        [sys.executable, *map(str, command)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return time.perf_counter() - clock, started, time.time()


def fast_breakdown(out_dir, started, ended):
    """Where a `fast` run's wall time went, in seconds, from its metrics.json timeline."""
    metrics = json.loads((out_dir / "metrics.json").read_text())
    line = metrics["timeline"]
    training = metrics["training_seconds"]
    return {
        "imports": line["imported"] - started,
        "data": line["data_loaded"] - line["main"],
        "training": training,
        "evaluation and set-up": line["evaluated"] - line["data_loaded"] - training,
        "outputs": line["written"] - line["evaluated"],
        "exit": ended - line["written"],
    }


def tree_of(revision, folder):
    """The files of a commit, unpacked into `folder`; returns its script."""
    folder.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder / "mnist_recognition.py"


def median(values):
    return statistics.median(values)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="rounds; the median of them is printed")
    parser.add_argument("--baseline", help="a git revision (HEAD~1, a commit) to time alongside")
    parser.add_argument("--data-dir", type=Path, default=REPO / "data")
    parser.add_argument("--original", action="store_true", help="time the default recipe's whole run too")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        photo_of_a_digit(work / "digit.jpg")
        scripts = {"this": REPO / "mnist_recognition.py"}
        if args.baseline:
            scripts["baseline"] = tree_of(args.baseline, work / "baseline")
        # The model that evaluate and predict read.
        subprocess.run(
            [
                sys.executable,
                str(scripts["this"]),
                "--recipe",
                "fast",
                "--data-dir",
                str(args.data_dir),
                "--no-download",
                "--out-dir",
                str(work / "fast"),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        runs = [
            (version, name, command)
            for version, script in scripts.items()
            for name, command in cases(script, version, work, args.data_dir, args.original).items()
            if not (version == "baseline" and name in THIS_TREE_ONLY)
        ]
        seconds = {(version, name): [] for version, name, _ in runs}
        breakdowns = {version: [] for version in scripts}
        for round_index in range(args.runs):
            shift = round_index % len(runs)
            for version, name, command in runs[shift:] + runs[:shift]:
                wall, started, ended = run(command)
                seconds[(version, name)].append(wall)
                if name == "train --recipe fast":
                    breakdowns[version].append(fast_breakdown(work / f"train-{version}", started, ended))
        report(args, scripts, seconds, breakdowns)


def report(args, scripts, seconds, breakdowns):
    bare = median(seconds[("this", "python -c 'import torch'")])
    print(f"median wall seconds of {args.runs} runs (all runs in brackets)")
    for name in cases(Path("s"), "this", Path("."), args.data_dir, args.original):
        this = median(seconds[("this", name)])
        line = f"{name:<26} this {this:6.2f} s [{', '.join(f'{v:.2f}' for v in seconds[('this', name)])}]"
        if ("baseline", name) in seconds:
            old = median(seconds[("baseline", name)])
            line += f"   baseline {old:6.2f} s   baseline/this {old / this:.2f}x"
        print(line)
    detector_cost = median(seconds[("this", "train --recipe fast")]) / median(seconds[("this", "fast --no-detector")])
    print(f"--recipe fast with the kept detector / with --no-detector: {detector_cost:.3f}x")
    for version in scripts:
        parts = {part: median([b[part] for b in breakdowns[version]]) for part in breakdowns[version][0]}
        wall = median(seconds[(version, "train --recipe fast")])
        print(
            f"\n{version}: --recipe fast, median seconds: "
            + ", ".join(f"{part} {value:.2f}" for part, value in parts.items())
            + f"; wall / training seconds {wall / parts['training']:.2f}x"
        )
        for name in ("predict (one image)", "evaluate (10,000 images)"):
            print(f"{version}: {name} / bare import torch {median(seconds[(version, name)]) / bare:.2f}x")


if __name__ == "__main__":
    main()
