#!/usr/bin/env python3
"""The deletion check of the page's "why" (gradient x input) on real test digits.

For each of the first N test images: the probability of the model's answer, that probability once
the fifth of the ink that the attribution ranks highest is erased, and once as much ink is erased at
random (the mean of 10 draws). It prints a line per image and on how many the attributed ink
mattered more.

    python benchmarks/attribution_check.py --checkpoint outputs/lenet5_mnist.pt --images 10
"""

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import mnist_recognition as app  # noqa: E402
from companions.reports import inside  # noqa: E402
from companions.using.trained import load_trained_model  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=REPO / "outputs" / "lenet5_mnist.pt")
    parser.add_argument("--data-dir", type=Path, default=REPO / "data")
    parser.add_argument("--images", type=int, default=10, help="the first N test images")
    args = parser.parse_args()

    cpu = torch.device("cpu")
    model, payload = load_trained_model(args.checkpoint, cpu)
    dataset = app.DATASETS[payload.get("config", {}).get("dataset", "mnist")]
    images, labels = app.normalised_split(args.data_dir, dataset, False, args.images, cpu)
    passed = 0
    print("image  label  probability  most attributed ink erased  as much random ink erased")
    for index, (image, label) in enumerate(zip(images, labels)):
        before, most, random = inside.deletion_check(model, image, dataset)
        passed += most < random
        print(f"{index:>5}  {int(label):>5}  {before:>11.3f}  {most:>26.3f}  {random:>25.3f}")
    print(f"the attributed ink mattered more on {passed} of {len(labels)} images")


if __name__ == "__main__":
    main()
