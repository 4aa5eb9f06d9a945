#!/usr/bin/env python3
"""finetune's settings, compared on the validation split, never the test set.

    python mnist_recognition.py --validation 10000 --out-dir outputs/validation     # the default recipe, held out
    python benchmarks/finetune_settings.py --checkpoint outputs/validation/lenet5_mnist.pt --per-class 20

For each simulated writer of personal_handwriting.py (a handwriting font), --per-class images per
class are made; finetune's own seeded hold-out keeps a quarter of them apart. Each setting fine-
tunes the model on the rest, mixed with the first 50,000 training images only, and is measured on
the held-out images and on the last 10,000 training images, which the model never saw.
"""

import argparse
import copy
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import personal_handwriting  # noqa: E402

import mnist_recognition as app  # noqa: E402
from companions.training import devices  # noqa: E402
from companions.using import finetune, own_images, trained  # noqa: E402

SETTINGS = [(3e-4, 0.25, 300), (1e-4, 0.25, 300), (3e-4, 0.125, 300), (1e-4, 0.125, 300), (3e-4, 0.25, 150)]


def writers_images(per_class, mnist):
    found = {}
    with tempfile.TemporaryDirectory() as scratch:
        for index, (name, font) in enumerate(personal_handwriting.WRITERS.items()):
            if not Path(font).is_file():
                continue
            rng, folder = np.random.default_rng(100 + index), Path(scratch) / str(index)
            for digit in range(10):
                (folder / str(digit)).mkdir(parents=True)
                for number in range(per_class):
                    image = personal_handwriting.written(font, digit, rng)
                    (folder / str(digit) / f"{number}.png").write_bytes(image)
            found[name] = own_images.read_folder(folder, mnist)
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a model trained with --validation 10000")
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parent.parent / "data")
    args = parser.parse_args()

    cpu, mnist = torch.device("cpu"), app.DATASETS["mnist"]
    base, payload = trained.load_trained_model(args.checkpoint, cpu)
    if payload.get("config", {}).get("validation") != 10000:
        sys.exit(f"{args.checkpoint} was not trained with --validation 10000")
    images, labels = app.normalised_split(args.data_dir, mnist, True, None, cpu)
    train, validation = (images[:50000], labels[:50000]), (images[50000:], labels[50000:])
    runtime = devices.Runtime(cpu)
    print(f"validation accuracy before: {app.evaluate(base, validation, 'validation', runtime).accuracy:.2f} %")
    writers = writers_images(args.per_class, mnist)
    for lr, share, steps in SETTINGS:
        finetune.OWN_SHARE_OF_BATCH = share
        held_accuracies, validation_accuracies = [], []
        for found in writers.values():
            held = finetune.stratified_hold_out(found.labels, 0.25, 0)
            learn = torch.ones(len(found.labels), dtype=torch.bool)
            learn[held] = False
            model = copy.deepcopy(base)
            settings = types.SimpleNamespace(lr=lr, steps=steps, batch_size=128, seed=0)
            finetune.fine_tune(model, (found.inputs[learn], found.labels[learn]), train, mnist, settings, runtime)
            held_accuracies.append(app.evaluate(model, (found.inputs[held], found.labels[held]), "h", runtime).accuracy)
            validation_accuracies.append(app.evaluate(model, validation, "validation", runtime).accuracy)
        print(
            f"lr {lr:g}, own share {share:g}, {steps} steps: held-out images mean {np.mean(held_accuracies):.2f} %, "
            f"lowest {min(held_accuracies):.2f} %; validation mean {np.mean(validation_accuracies):.2f} %, "
            f"lowest {min(validation_accuracies):.2f} %",
            flush=True,
        )


if __name__ == "__main__":
    main()
