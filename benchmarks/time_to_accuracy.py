#!/usr/bin/env python3
"""Time each recipe to its test accuracy, side by side with the original pipeline.

For every seed, in one run: one epoch of the original DataLoader pipeline (scaled to its ten
epochs), then each recipe in full, each in a fresh process, in an order that rotates from seed
to seed. Training seconds are the sum of the epochs' seconds (no start-up, data loading or
evaluation). The speed-up compares a recipe's training seconds with the original's ten epochs
measured in the same round.

    python benchmarks/time_to_accuracy.py                      # seeds 0 1 2, recipes seed fast best
    python benchmarks/time_to_accuracy.py --recipes fast --seeds 0
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from compare_pipeline import REPO, run_original


def run_recipe(recipe, seed, data_dir):
    """(training seconds, test accuracy) of one whole run of the recipe."""
    with tempfile.TemporaryDirectory() as out_dir:
        subprocess.run([sys.executable, str(REPO / "mnist_recognition.py"), "--recipe", recipe, "--seed", str(seed),
                        "--data-dir", data_dir, "--out-dir", out_dir, "--no-download"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        metrics = json.loads((Path(out_dir) / "metrics.json").read_text())
    return metrics["training_seconds"], metrics["test_accuracy"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["seed", "fast", "best"], help="recipes to time")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="one round per seed")
    parser.add_argument("--data-dir", default=str(REPO / "data"), help="folder holding MNIST/raw/")
    args = parser.parse_args()

    rows = []
    print(f"{'recipe':<9} {'seed':>4} {'test acc %':>10} {'train s':>8} {'speed-up':>9}", flush=True)
    for round_index, seed in enumerate(args.seeds):
        names = ["original", *args.recipes]
        names = names[round_index % len(names):] + names[:round_index % len(names)]  # rotate the order
        results = {}
        for name in names:
            if name == "original":
                seconds, accuracy = run_original(1, seed, args.data_dir)
                results[name] = (10 * seconds[0], accuracy)  # one epoch, scaled to the original's ten
            else:
                results[name] = run_recipe(name, seed, args.data_dir)
        original_seconds = results["original"][0]
        for name in ["original", *args.recipes]:
            seconds, accuracy = results[name]
            rows.append((name, seed, accuracy, seconds, original_seconds / seconds))
            note = " (1 epoch x 10; accuracy after 1 epoch)" if name == "original" else ""
            print(f"{name:<9} {seed:>4} {accuracy:>10.2f} {seconds:>8.1f} {original_seconds / seconds:>8.1f}x{note}",
                  flush=True)

    print("\nper recipe over the seeds: mean and lowest test accuracy, median training seconds and speed-up")
    for name in args.recipes:
        mine = [row for row in rows if row[0] == name]
        accuracies = [row[2] for row in mine]
        print(f"{name:<9} mean {statistics.mean(accuracies):.2f} %, lowest {min(accuracies):.2f} %, "
              f"{statistics.median(row[3] for row in mine):.1f} s, {statistics.median(row[4] for row in mine):.1f}x")


if __name__ == "__main__":
    main()
