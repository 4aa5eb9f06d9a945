#!/usr/bin/env python3
"""How well audit finds wrong labels: errors planted where they are known, and one outside check.

    python benchmarks/audit.py --checkpoint outputs/lenet5_mnist.pt [--folds 3 5 10]

Every audit runs as a user runs it, `mnist_recognition.py audit ...` in a process of its own, and
is timed whole (wall seconds, with its folds' training). Printed:

1. Planted in the training split: a copy of MNIST's training labels with 1 % of them (seeded)
   changed to another class drawn at random, the images untouched; `audit --split train` on it, for
   each --folds. Of the flipped labels, the share among as many strongest suspects as were flipped
   (there precision and recall are one number), and among all suspects; the wall time.
2. Planted in a drawn folder: 20 MNIST test digits of each class re-drawn with a pen on a canvas
   (benchmarks/handwriting.py's MNIST-like pen), 10 of the 200 saved in a wrong class's folder;
   `audit --images` with --checkpoint (which never saw test digits). How many of the 10 are among
   the 20 strongest suspects, and whether every file of the folder is byte for byte as it was. The
   same for kinds audit was not tuned on: the digits photographed on paper, and typed in the
   handwriting fonts installed.
3. The outside check: `audit --split test` (the folds' models) against the 100 test images that
   Northcutt, Athalye and Mueller (2021, "Pervasive Label Errors in Test Sets Destabilize Machine
   Learning Benchmarks") flagged with confident learning, and the 15 of them that most of five crowd
   workers judged mislabelled (fewer than three of five chose the given label; the study's
   mturk/mnist_mturk.json in github.com/cleanlab/label-errors). How many the 100 strongest suspects
   hold. Measured once, not tuned to.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import handwriting  # noqa: E402
import personal_handwriting  # noqa: E402

import mnist_recognition as app  # noqa: E402
from companions.reports.report import cpu_name  # noqa: E402

SCRIPT = Path(__file__).resolve().parent.parent / "mnist_recognition.py"
FLIPPED_SHARE = 0.01
PER_CLASS, MISFILED, LOOKED_AT = 20, 10, 20
JPEG_START = b"\xff\xd8"
# The study's 100 candidates in MNIST's test split, and the 15 crowd-validated label errors among them.
CANDIDATES = (
    247, 259, 321, 340, 445, 449, 582, 619, 717, 720, 726, 740, 810, 938, 947, 1014, 1033, 1039, 1112, 1119,
    1226, 1232, 1299, 1364, 1393, 1530, 1621, 1681, 1709, 1901, 2035, 2043, 2109, 2130, 2135, 2182, 2293, 2380,
    2406, 2447, 2454, 2462, 2597, 2654, 2836, 2896, 2921, 2927, 2939, 3060, 3073, 3206, 3422, 3503, 3520, 3558,
    3597, 3767, 3778, 3850, 3869, 3906, 4007, 4176, 4201, 4207, 4224, 4497, 4639, 4783, 4823, 4860, 4874, 4876,
    4880, 4956, 4978, 5887, 5937, 5955, 6505, 6572, 6576, 6597, 6625, 6651, 6783, 7434, 7842, 8094, 8408, 8527,
    9009, 9634, 9642, 9664, 9679, 9729, 9755, 9888,
)  # fmt: skip
VALIDATED = (947, 1621, 1901, 2130, 2462, 2597, 2654, 3520, 3558, 5937, 6651, 6783, 8527, 9679, 9729)


def audit(*flags):
    """Run audit; (its audit.json, its wall seconds)."""
    out_dir = flags[flags.index("--out-dir") + 1]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(SCRIPT), "audit", *flags], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 1):
        sys.exit(f"audit {' '.join(flags)} failed:\n{done.stderr[-3000:]}")
    return json.loads((Path(out_dir) / "audit.json").read_text()), seconds


# --- 1. planted in the training split -------------------------------------------------------------


def flipped_copy(data_dir, folder, share, seed):
    """A data folder whose training labels have `share` of them changed; the other files linked.
    Returns the flipped indices."""
    source, raw = Path(data_dir) / "MNIST" / "raw", Path(folder) / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        os.symlink((source / name).resolve(), raw / name)
    labels = bytearray((source / "train-labels-idx1-ubyte").read_bytes())
    rng = np.random.default_rng(seed)
    count = len(labels) - 8
    flipped = sorted(rng.choice(count, round(share * count), replace=False).tolist())
    for index in flipped:
        labels[8 + index] = (labels[8 + index] + rng.integers(1, 10)) % 10
    (raw / "train-labels-idx1-ubyte").write_bytes(bytes(labels))
    return flipped


def planted_in_training(data_dir, folds_list, scratch):
    flipped = flipped_copy(data_dir, scratch / "flipped", FLIPPED_SHARE, seed=0)
    print(f"\n1. {len(flipped)} of the training labels flipped ({100 * FLIPPED_SHARE:g} %), audit --split train")
    print(f"   folds  found among the strongest {len(flipped)}  among all suspects (of them)  wall seconds")
    for folds in folds_list:
        found, seconds = audit(
            "--split", "train", "--folds", str(folds), "--data-dir", str(scratch / "flipped"),
            "--out-dir", str(scratch / f"train-{folds}"),
        )  # fmt: skip
        ranked = [entry["index"] for entry in found["suspects"]]
        top = len(set(ranked[: len(flipped)]) & set(flipped))
        every = len(set(ranked) & set(flipped))
        print(
            f"   {folds:>5}  {100 * top / len(flipped):>26.1f} %  {100 * every / len(flipped):>14.1f} % "
            f"({len(ranked):>5})  {seconds:>12.0f}"
        )


# --- 2. planted in a drawn folder -----------------------------------------------------------------


def chosen_test_digits(data_dir):
    """20 test digits of each class (seeded): [(pixels, label)]."""
    images, labels = app.raw_split(data_dir, app.DATASETS["mnist"], train=False)
    rng = np.random.default_rng(0)
    chosen = []
    for digit in range(10):
        members = np.flatnonzero(labels.numpy() == digit)
        chosen += [(images[i].numpy(), digit) for i in rng.choice(members, PER_CLASS, replace=False)]
    return chosen


def folder_of(kind, data_dir, folder, rng):
    """Write the kind's 200 images into folder/<class>/, 10 of them into a wrong class's folder.
    Returns the misfiled files."""
    if kind == "fonts":
        fonts = [path for path in handwriting.FONTS if Path(path).is_file()]
        images = [
            (personal_handwriting.written(fonts[index % len(fonts)], digit, rng), digit)
            for digit in range(10)
            for index in range(PER_CLASS)
        ]
    else:
        make = (
            (lambda pixels: handwriting.drawn(pixels, 28))
            if kind == "drawn"
            else (lambda pixels: handwriting.photographed(pixels, rng))
        )
        images = [(handwriting.encoded(*make(pixels)), digit) for pixels, digit in chosen_test_digits(data_dir)]
    misfiled_at = set(rng.choice(len(images), MISFILED, replace=False).tolist())
    misfiled = []
    for index, (body, digit) in enumerate(images):
        label = (digit + int(rng.integers(1, 10))) % 10 if index in misfiled_at else digit
        suffix = "jpg" if body.startswith(JPEG_START) else "png"
        path = Path(folder) / str(label) / f"{index}.{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
        if index in misfiled_at:
            misfiled.append(str(path))
    return misfiled


def fingerprint(folder):
    paths = sorted(path for path in Path(folder).rglob("*") if path.is_file())
    return {str(path): hashlib.sha256(path.read_bytes()).hexdigest() for path in paths}


def planted_in_folders(data_dir, checkpoint, scratch):
    print(
        f"\n2. {MISFILED} of {10 * PER_CLASS} images in a wrong class's folder, "
        f"audit --images --checkpoint {checkpoint}"
    )
    print(f"   kind          found among the strongest {LOOKED_AT}  suspects  folder unchanged")
    for kind in ("drawn", "photographed", "fonts"):
        folder = scratch / f"folder-{kind}"
        misfiled = folder_of(kind, data_dir, folder, np.random.default_rng(1))
        before = fingerprint(folder)
        found, _ = audit(
            "--images", str(folder), "--checkpoint", str(checkpoint), "--out-dir", str(scratch / f"audit-{kind}")
        )
        strongest = [entry["file"] for entry in found["suspects"][:LOOKED_AT]]
        hits = len(set(strongest) & set(misfiled))
        same = "yes" if fingerprint(folder) == before else "NO"
        print(f"   {kind:<12}  {hits:>22} of {MISFILED}  {len(found['suspects']):>8}  {same:>15}")


# --- 3. the outside check -------------------------------------------------------------------------


def outside_check(data_dir, folds, scratch):
    found, seconds = audit(
        "--split", "test", "--folds", str(folds), "--data-dir", str(data_dir), "--out-dir", str(scratch / "test")
    )
    ranked = [entry["index"] for entry in found["suspects"]]
    strongest = set(ranked[:100])
    print(f"\n3. audit --split test ({folds} folds' models, {seconds:.0f} s): {len(ranked)} suspects")
    print(
        f"   of the 15 crowd-validated label errors: {len(strongest & set(VALIDATED))} among the 100 strongest suspects"
    )
    print(f"   of the study's 100 candidates: {len(strongest & set(CANDIDATES))} among the 100 strongest suspects")
    print(f"   missed: {sorted(set(VALIDATED) - strongest)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint", type=Path, default=Path("outputs/lenet5_mnist.pt"), help="the model that reads the folders"
    )
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--folds", type=int, nargs="+", default=[5], help="the training audits' folds, one audit each")
    args = parser.parse_args()
    print(f"{cpu_name()}, {os.cpu_count()} cores")
    scratch = Path(tempfile.mkdtemp(prefix="audit-benchmark-"))
    try:
        planted_in_training(args.data_dir, args.folds, scratch)
        planted_in_folders(args.data_dir, args.checkpoint, scratch)
        outside_check(args.data_dir, args.folds[0], scratch)
    finally:
        shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
