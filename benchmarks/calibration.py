#!/usr/bin/env python3
"""Whether each recipe's probabilities mean what they say, before and after its temperature.

    python benchmarks/calibration.py                       # original, fast and best; seeds 0 1 2
    python benchmarks/calibration.py --recipes fast --seeds 0

Trains each recipe and seed (into outputs/benchmarks/calibration/RECIPE-seed-K/, reused when its
model file is there already) as `python mnist_recognition.py --recipe RECIPE --seed K` does. The
temperature and both thresholds are learned from the training images alone; the test set is read
only to measure them, as training itself does at its end (metrics.json's "trust"). Prints per run
the test accuracy, the temperature, the expected calibration error (15 bins) before and after, and
the shares of right and of wrong answers that the verdicts flag ("not sure" or "not a digit").
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def trained(recipe, seed, runs, data_dir):
    """The metrics.json of a run of `recipe` with `seed`, trained unless it is there already."""
    out_dir = runs / f"{recipe}-seed-{seed}"
    if not (out_dir / "lenet5_mnist.pt").is_file():
        command = [sys.executable, str(ROOT / "mnist_recognition.py"), "--recipe", recipe, "--seed", str(seed)]
        command += ["--data-dir", str(data_dir), "--out-dir", str(out_dir), "--no-figures"]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((out_dir / "metrics.json").read_text())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["original", "fast", "best"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data")
    parser.add_argument("--runs", type=Path, default=ROOT / "outputs" / "benchmarks" / "calibration")
    args = parser.parse_args()

    print("| recipe | seed | test accuracy | temperature | ECE before | ECE after | right flagged | wrong flagged |")
    print("|---|---|---|---|---|---|---|---|")
    for recipe in args.recipes:
        after = []
        for seed in args.seeds:
            metrics = trained(recipe, seed, args.runs, args.data_dir)
            trust = metrics["trust"]
            after.append(100 * trust["ece"])
            print(
                f"| {recipe} | {seed} | {metrics['eval_accuracy']:.2f} % | {trust['temperature']:.3f} | "
                f"{100 * trust['ece_before']:.2f} % | {100 * trust['ece']:.2f} % | "
                f"{100 * trust['right_flagged']:.2f} % | {100 * trust['wrong_flagged']:.1f} % |"
            )
        print(f"| {recipe} | mean | | | | **{statistics.mean(after):.2f} %** | | |")


if __name__ == "__main__":
    main()
