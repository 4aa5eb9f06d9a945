#!/usr/bin/env python3
"""The probability below which predict, serve and /predict say "not sure": chosen on the validation split.

    python mnist_recognition.py --validation 10000 --out-dir outputs/validation     # the default recipe, held out
    python benchmarks/unsure_threshold.py --checkpoint outputs/validation/lenet5_mnist.pt

The model was trained without its last N training images (--validation N); this reads them back,
and prints the lowest threshold at which the answers flagged as unsure hold at least half of the
wrong ones, with what share of the right answers it flags too, next to a few other thresholds.
The test set is never read.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mnist_recognition as app  # noqa: E402
from companions.devices import Runtime  # noqa: E402
from companions.trained import load_trained_model  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a model trained with --validation N")
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parent.parent / "data")
    parser.add_argument("--wrong-share", type=float, default=0.5, help="the share of wrong answers to flag")
    args = parser.parse_args()

    model, payload = load_trained_model(args.checkpoint, torch.device("cpu"))
    held_out = payload.get("config", {}).get("validation", 0)
    if payload.get("eval_split") != "validation" or not held_out:
        sys.exit(f"{args.checkpoint} was not trained with --validation N: its held-out images are unknown")
    dataset = app.DATASETS[payload["config"]["dataset"]]
    images, labels = app.normalised_split(args.data_dir, dataset, True, None, torch.device("cpu"))
    validation = (images[-held_out:], labels[-held_out:])
    evaluation = app.evaluate(model, validation, "validation", Runtime(torch.device("cpu")))
    right = evaluation.predicted == evaluation.labels
    wrong_confidence = evaluation.confidence[~right].sort().values
    # The lowest threshold that flags (probability below it) at least this share of the wrong answers.
    needed = int(torch.tensor(args.wrong_share * len(wrong_confidence)).ceil())
    threshold = wrong_confidence[needed - 1].item() + 1e-6
    print(f"{args.checkpoint}: {len(evaluation.labels)} validation images, {int((~right).sum())} wrong")
    print(f"lowest threshold flagging {args.wrong_share:.0%} of the wrong answers: {threshold:.4f}")
    print(f"{'threshold':>10} {'wrong flagged':>14} {'right flagged':>14}")
    for value in sorted({round(threshold, 2), 0.5, 0.6, 0.7, 0.8, 0.9, 0.95}):
        flagged = evaluation.confidence < value
        wrong_flagged, right_flagged = flagged[~right].float().mean().item(), flagged[right].float().mean().item()
        print(f"{value:>10.2f} {wrong_flagged:>13.1%} {right_flagged:>13.1%}")


if __name__ == "__main__":
    main()
