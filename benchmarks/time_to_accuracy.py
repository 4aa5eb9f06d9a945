#!/usr/bin/env python3
"""Time each recipe to its test accuracy, side by side with the classic DataLoader pipeline.

For every seed, in one run: one epoch of the seed program's per-sample DataLoader pipeline
(scaled to its ten epochs; "dataloader" below), then each recipe in full, each in a fresh
process, in an order that rotates from seed to seed. Training seconds are the sum of the epochs'
seconds (no start-up, data loading or evaluation); wall seconds are the whole command's, from
starting the process to its exit, as `time python mnist_recognition.py --recipe R` shows them.
The speed-up compares a recipe's training seconds with the DataLoader pipeline's ten epochs
measured in the same round. At the end it prints where each recipe's wall time went, from the
timeline in metrics.json: the interpreter's start, imports, reading the data, training, evaluation
(with checkpoints and logs), writing the outputs, and the process's exit.

    python benchmarks/time_to_accuracy.py                      # seeds 0 1 2, recipes original fast best
    python benchmarks/time_to_accuracy.py --recipes fast --seeds 0
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from compare_pipeline import REPO, run_original

PHASES = ("start-up", "imports", "data", "training", "evaluation", "outputs", "exit")


def phases(metrics, spawned, exited):
    """The wall time of one run split into PHASES, from its timeline (seconds since the epoch)."""
    timeline, training = metrics["timeline"], metrics["training_seconds"]
    return {
        "start-up": timeline["started"] - spawned,
        "imports": timeline["imported"] - timeline["started"],
        "data": timeline["data_loaded"] - timeline["imported"],
        "training": training,
        "evaluation": timeline["evaluated"] - timeline["data_loaded"] - training,
        "outputs": timeline["written"] - timeline["evaluated"],
        "exit": exited - timeline["written"],
    }


def run_recipe(recipe, seed, data_dir, keep_in=None):
    """(training seconds, test accuracy, wall seconds, phases) of one whole run of the recipe; its
    outputs are kept in keep_in/<recipe>-seed<seed>/ if keep_in is given."""
    with tempfile.TemporaryDirectory() as scratch:
        out_dir = Path(keep_in) / f"{recipe}-seed{seed}" if keep_in else Path(scratch)
        spawned, started = time.time(), time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                str(REPO / "mnist_recognition.py"),
                "--recipe",
                recipe,
                "--seed",
                str(seed),
                "--data-dir",
                data_dir,
                "--out-dir",
                str(out_dir),
                "--no-download",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wall_seconds, exited = time.perf_counter() - started, time.time()
        metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["eval_split"] == "test"
    return metrics["training_seconds"], metrics["eval_accuracy"], wall_seconds, phases(metrics, spawned, exited)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["original", "fast", "best"], help="recipes to time")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="one round per seed")
    parser.add_argument("--data-dir", default=str(REPO / "data"), help="folder holding MNIST/raw/")
    parser.add_argument("--keep-outputs", metavar="DIR", help="keep each run's outputs in DIR/<recipe>-seed<seed>/")
    args = parser.parse_args()

    rows = []
    print(f"{'recipe':<10} {'seed':>4} {'test acc %':>10} {'train s':>8} {'wall s':>7} {'speed-up':>9}", flush=True)
    for round_index, seed in enumerate(args.seeds):
        names = ["dataloader", *args.recipes]
        names = names[round_index % len(names) :] + names[: round_index % len(names)]  # rotate the order
        results = {}
        for name in names:
            if name == "dataloader":
                seconds, accuracy = run_original(1, seed, args.data_dir)
                results[name] = (10 * seconds[0], accuracy, float("nan"), None)  # one epoch, scaled to its ten
            else:
                results[name] = run_recipe(name, seed, args.data_dir, args.keep_outputs)
        dataloader_seconds = results["dataloader"][0]
        for name in ["dataloader", *args.recipes]:
            seconds, accuracy, wall_seconds, split = results[name]
            rows.append((name, seed, accuracy, seconds, dataloader_seconds / seconds, wall_seconds, split))
            note = " (1 epoch x 10; accuracy after 1 epoch)" if name == "dataloader" else ""
            print(
                f"{name:<10} {seed:>4} {accuracy:>10.2f} {seconds:>8.1f} {wall_seconds:>7.1f} "
                f"{dataloader_seconds / seconds:>8.1f}x{note}",
                flush=True,
            )

    print(
        "\nper recipe over the seeds: mean and lowest test accuracy, median training seconds, wall seconds and speed-up"
    )
    for name in args.recipes:
        mine = [row for row in rows if row[0] == name]
        accuracies = [row[2] for row in mine]
        print(
            f"{name:<10} mean {statistics.mean(accuracies):.2f} %, lowest {min(accuracies):.2f} %, "
            f"{statistics.median(row[3] for row in mine):.1f} s training, "
            f"{statistics.median(row[5] for row in mine):.1f} s wall, {statistics.median(row[4] for row in mine):.1f}x"
        )

    print("\nwhere the wall time went, per recipe: the median of each part, in seconds")
    print(f"{'recipe':<10} " + " ".join(f"{phase:>10}" for phase in PHASES) + f" {'wall':>7}")
    for name in args.recipes:
        mine = [row for row in rows if row[0] == name]
        print(
            f"{name:<10} "
            + " ".join(f"{statistics.median(row[6][phase] for row in mine):>10.2f}" for phase in PHASES)
            + f" {statistics.median(row[5] for row in mine):>7.2f}"
        )


if __name__ == "__main__":
    main()
