#!/usr/bin/env python3
"""The wall time of whole commands, as `time` shows it, from starting the process to its exit.

    python benchmarks/wall_time.py --runs 5
    python benchmarks/wall_time.py --runs 5 --baseline /tmp/old_mnist_recognition.py   # side by side

Cases: `--recipe fast` (training, with every output written), `evaluate` on the test set, and
`predict` on one photo-like image. Each round runs every case once, in an order that rotates from
round to round; with --baseline, another version of the script runs each case in the same rounds,
and the ratio of the medians is printed. The data must be in <data-dir>/MNIST/raw/.
"""
import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

REPO = Path(__file__).resolve().parent.parent


def photo_of_a_digit(path):
    """A digit drawn with Pillow's default font, enlarged, dark on light paper, blurred: a phone photo."""
    from PIL import ImageDraw
    image = Image.new("L", (28, 28), 0)
    ImageDraw.Draw(image).text((9, 6), "7", fill=255)
    image = image.resize((280, 280), Image.Resampling.BICUBIC)
    paper = 230 - np.asarray(image, dtype=np.float32) * 0.8
    Image.fromarray(paper.astype(np.uint8)).filter(ImageFilter.GaussianBlur(2)).save(path, quality=85)


def cases(script, version, work, data_dir):
    checkpoint = work / "fast" / "lenet5_mnist.pt"
    return {
        "train --recipe fast": [script, "--recipe", "fast", "--data-dir", data_dir, "--no-download",
                                "--out-dir", work / f"train-{version}"],
        "evaluate (10,000 images)": [script, "evaluate", "--checkpoint", checkpoint, "--data-dir", data_dir,
                                     "--no-download", "--out-dir", work / f"evaluate-{version}"],
        "predict (one image)": [script, "predict", work / "digit.jpg", "--checkpoint", checkpoint],
    }


def wall_seconds(command):
    started = time.perf_counter()
    subprocess.run([sys.executable, *map(str, command)], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="rounds; the median of them is printed")
    parser.add_argument("--baseline", type=Path, help="another version of mnist_recognition.py to time alongside")
    parser.add_argument("--data-dir", type=Path, default=REPO / "data")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        photo_of_a_digit(work / "digit.jpg")
        subprocess.run([sys.executable, str(REPO / "mnist_recognition.py"), "--recipe", "fast", "--data-dir",
                        str(args.data_dir), "--no-download", "--out-dir", str(work / "fast")],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # the model to use
        scripts = {"this": REPO / "mnist_recognition.py"}
        if args.baseline:
            baseline = work / "baseline" / "mnist_recognition.py"  # a folder of its own: its outputs apart
            baseline.parent.mkdir()
            baseline.write_bytes(args.baseline.read_bytes())
            scripts["baseline"] = baseline
        runs = [(version, name, command) for version, script in scripts.items()
                for name, command in cases(script, version, work, args.data_dir).items()]
        seconds = {(version, name): [] for version, name, _ in runs}
        for round_index in range(args.runs):
            shift = round_index % len(runs)
            for version, name, command in runs[shift:] + runs[:shift]:
                seconds[(version, name)].append(wall_seconds(command))

    print(f"median wall seconds of {args.runs} runs (all runs in brackets)")
    for name in cases(REPO / "mnist_recognition.py", "this", Path("."), args.data_dir):
        line = f"{name:<26} this {statistics.median(seconds[('this', name)]):6.2f} s " \
               f"[{', '.join(f'{value:.2f}' for value in seconds[('this', name)])}]"
        if args.baseline:
            old = statistics.median(seconds[("baseline", name)])
            line += f"   baseline {old:6.2f} s   {old / statistics.median(seconds[('this', name)]):.2f}x faster"
        print(line)


if __name__ == "__main__":
    main()
