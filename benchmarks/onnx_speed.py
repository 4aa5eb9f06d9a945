#!/usr/bin/env python3
"""Images per second on the CPU: the exported ONNX file in ONNX Runtime against the PyTorch model
(and the int8 file, given --int8), at batch 1 and batch 1000, side by side in one run.

    python benchmarks/onnx_speed.py --checkpoint outputs/lenet5_mnist.pt --onnx outputs/lenet5_mnist.onnx \
        --int8 outputs/lenet5_mnist.int8.onnx

Both compute the same thing: 0..1 pixels in, normalised, LeNet-5, softmax at the model's
temperature, and the "not a digit" detector where the model has one. PyTorch runs the model
as the script does on a CPU (channels-last, eval mode, inference_mode), with its default threads;
ONNX Runtime with its defaults. Each round times every case once, in an order that rotates from
round to round; the medians over rounds are printed, with the ratio ONNX Runtime / PyTorch.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mnist_recognition as app  # noqa: E402
from companions.reports.report import cpu_name  # noqa: E402
from companions.sharing.export import PixelsToProbabilities  # noqa: E402
from companions.using.trained import doubt_of, load_trained_model  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("outputs") / app.MODEL_FILE)
    parser.add_argument(
        "--onnx",
        type=Path,
        default=Path("outputs") / "lenet5_mnist.onnx",
        help="the file `mnist_recognition.py export` wrote from the same checkpoint",
    )
    parser.add_argument("--int8", type=Path, default=None, help="the file `export --int8` wrote, timed too")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--images", type=int, default=2000, help="images per case per round")
    return parser.parse_args()


def torch_runner(checkpoint):
    """The same computation as the file's in PyTorch: the model at its temperature and, where it has
    one, its "not a digit" detector."""
    model, payload = load_trained_model(checkpoint, torch.device("cpu"))
    dataset = app.DATASETS[payload.get("config", {}).get("dataset", "mnist")]
    whole = PixelsToProbabilities(model, dataset, doubt_of(payload, checkpoint, torch.device("cpu"))).eval()

    def run(pixels):
        with torch.inference_mode():
            return whole(torch.from_numpy(pixels))[1].numpy()

    return run


def onnx_runner(path):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = [output.name for output in session.get_outputs()]
    return lambda pixels: session.run(outputs, {"image": pixels})[1]  # every output computed; probabilities kept


def images_per_second(run, batches):
    started = time.perf_counter()
    for batch in batches:
        run(batch)
    return sum(len(batch) for batch in batches) / (time.perf_counter() - started)


def main():
    args = parse_args()
    runners = {"pytorch": torch_runner(args.checkpoint), "onnxruntime": onnx_runner(args.onnx)}
    if args.int8:
        runners["int8"] = onnx_runner(args.int8)
    rng = np.random.default_rng(0)
    pixels = rng.random((args.images, 1, 28, 28), dtype=np.float32)
    check = pixels[:1000]
    for name in list(runners)[1:]:
        difference = np.abs(runners["pytorch"](check) - runners[name](check)).max()
        print(f"{name}: largest difference in a probability from PyTorch's on 1000 random images: {difference:.2e}")
    cases = [(name, batch) for batch in (1, 1000) for name in runners]
    rates = {case: [] for case in cases}
    for name, batch in cases:  # warm-up
        images_per_second(runners[name], [pixels[:batch]] * 3)
    for round_index in range(args.rounds):
        order = cases[round_index % len(cases) :] + cases[: round_index % len(cases)]
        for name, batch in order:
            batches = [pixels[start : start + batch] for start in range(0, args.images, batch)]
            rates[(name, batch)].append(images_per_second(runners[name], batches))
    print(
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {torch.get_num_threads()} threads, "
        f"{cpu_name()}; medians of {args.rounds} rounds of {args.images} images; ratios against pytorch"
    )
    print(f"{'batch':>6}" + "".join(f"{name + ' img/s':>18}{'ratio':>7}" for name in runners))
    for batch in (1, 1000):
        medians = {name: statistics.median(rates[(name, batch)]) for name in runners}
        row = "".join(f"{rate:>18,.0f}{rate / medians['pytorch']:>6.2f}x" for rate in medians.values())
        print(f"{batch:>6}{row}")
        if args.int8:
            print(f"{'':>6} int8 / float ONNX Runtime: {medians['int8'] / medians['onnxruntime']:.2f}x")


if __name__ == "__main__":
    main()
