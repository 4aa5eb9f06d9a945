"""export: a trained model as one self-contained ONNX file, checked with ONNX Runtime before it is written.

    python mnist_recognition.py export --checkpoint outputs/lenet5_mnist.pt   # -> outputs/lenet5_mnist.onnx

The file takes 0..1 pixels (the dataset's normalisation is inside the graph) and gives logits,
calibrated probabilities (the model's temperature is inside too) and, where the model has a
detector, its "not a digit" score; its metadata says how to prepare an image and where the
thresholds of "not sure" and "not a digit" lie (docs/export.md).
"""

import json

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from loguru import logger

import mnist_recognition as trainer
from companions import files, prepare, report
from companions.augment import generator_for
from companions.command_line import ONNX_TOLERANCE
from companions.dataset_files import TEST_FILES, has_files, raw_dir
from companions.errors import CliError
from companions.trained import doubt_of, trained_model

RANDOM_CHECK_IMAGES = 1000  # checked instead of the test set when its files are not on disk
OPSET = 20  # the ONNX operator set the file is written in, named so that another torch cannot change it


class PixelsToProbabilities(nn.Module):
    """LeNet-5 with the dataset's normalisation inside: 0..1 pixels in; logits, probabilities at the
    model's temperature and, where it has one, the detector's "not a digit" score out."""

    def __init__(self, model, dataset, learned):
        super().__init__()
        self.model, self.mean, self.std = model, dataset.mean, dataset.std
        self.temperature, self.detector = learned.temperature, learned.detector

    def forward(self, image):
        normalised = (image - self.mean) / self.std
        logits = self.model(normalised)
        probabilities = F.softmax(logits / self.temperature, dim=1)
        if self.detector is None:
            return logits, probabilities
        return logits, probabilities, self.detector(normalised)


def output_names(learned):
    return ["logits", "probabilities"] + (["not_a_digit"] if learned.detector is not None else [])


def check_images(data_dir, dataset):
    """(0..1 pixels, labels or None, what they are): the test split when its files are on disk,
    else a fixed batch of random pixels."""
    folder = raw_dir(data_dir, dataset)
    if has_files(data_dir, dataset, TEST_FILES):
        pixels, labels = trainer.pixel_split(data_dir, dataset, False, None)
        return pixels, labels, f"the {len(labels):,} test images in {folder}"
    pixels = torch.rand(RANDOM_CHECK_IMAGES, 1, 28, 28, generator=generator_for(0))
    return (
        pixels,
        None,
        f"{RANDOM_CHECK_IMAGES} images of random pixels ({dataset.title}'s test files are not in {folder})",
    )


def onnx_metadata(payload, dataset, test_accuracy, learned):
    """What a user of the file needs to know, as ONNX metadata_props (text only)."""
    config = payload.get("config", {})
    detector = (
        f"; not_a_digit: float32 [N], the detector's score: above {learned.not_a_digit_above:.6g} the image is "
        f"{dataset.not_of_kind} (the class is then a guess)"
        if learned.detector is not None
        else ""
    )
    return {
        "dataset": json.dumps({"name": dataset.name, "title": dataset.title, "classes": list(dataset.classes)}),
        "input": "image: float32 [N, 1, 28, 28], pixels 0..1, light on dark as in the dataset's files; "
        "the graph normalises them itself",
        "outputs": f"logits: float32 [N, 10]; probabilities: float32 [N, 10], the softmax of logits / "
        f"{learned.temperature:.6g} (the model's temperature): below {learned.unsure_below:.6g} the answer is "
        f"not sure{detector}",
        "temperature": f"{learned.temperature:.9g}",
        "unsure_below": f"{learned.unsure_below:.9g}",
        "not_a_digit_above": "none" if learned.detector is None else f"{learned.not_a_digit_above:.9g}",
        "preparation": prepare.describe(dataset),
        "test_accuracy": "unknown" if test_accuracy is None else f"{test_accuracy:.3f}",
        "recipe": str(config.get("recipe", "unknown")),
        "script_sha256": report.source_hash(),
    }


def onnx_bytes(model, dataset, learned, metadata):
    """The model as one self-contained ONNX file (weights inside), with a dynamic batch dimension."""
    program = torch.onnx.export(
        PixelsToProbabilities(model, dataset, learned).eval(),
        (torch.rand(2, 1, 28, 28),),
        dynamo=True,
        opset_version=OPSET,
        input_names=["image"],
        output_names=output_names(learned),
        dynamic_shapes={"image": {0: torch.export.Dim("batch")}},
        verbose=False,
    )
    graph = program.model_proto
    for key, value in metadata.items():
        graph.metadata_props.add(key=key, value=value)
    return graph.SerializeToString()


def compare_with_onnx_runtime(file_bytes, expected, pixels):
    """(answers that differ, the largest difference in a probability) between ONNX Runtime
    running the file and PyTorch's `expected` probabilities."""
    import onnxruntime  # only the check needs it

    session = onnxruntime.InferenceSession(file_bytes, providers=["CPUExecutionProvider"])
    probabilities = np.concatenate(
        [session.run(["probabilities"], {"image": batch.numpy()})[0] for batch in pixels.split(trainer.EVAL_BATCH_SIZE)]
    )
    expected = expected.numpy()
    return int((probabilities.argmax(1) != expected.argmax(1)).sum()), float(np.abs(probabilities - expected).max())


def command(args):
    """Export, check, then write; exit code 1 (and no file) where ONNX Runtime disagrees."""
    out = args.out or args.checkpoint.with_suffix(".onnx")
    files.prepare_folder(out.parent)
    model, payload, dataset = trained_model(args, torch.device("cpu"))
    learned = doubt_of(payload, args.checkpoint, torch.device("cpu"))
    model = model.to(memory_format=torch.contiguous_format)  # the plain layout, as the file stores it
    pixels, labels, described = check_images(args.data_dir, dataset)
    with torch.inference_mode():
        pytorch = PixelsToProbabilities(model, dataset, learned)
        expected = torch.cat([pytorch(batch)[1] for batch in pixels.split(trainer.EVAL_BATCH_SIZE)])
    test_accuracy = (
        100 * (expected.argmax(1) == labels).float().mean().item()
        if labels is not None
        else payload.get("eval_accuracy")
        if payload.get("eval_split") == "test"
        else None
    )
    file_bytes = onnx_bytes(model, dataset, learned, onnx_metadata(payload, dataset, test_accuracy, learned))
    differing, largest = compare_with_onnx_runtime(file_bytes, expected, pixels)
    logger.info(
        "ONNX Runtime against PyTorch on {}: {} answers differ, largest difference in a probability {:.2e}",
        described,
        differing,
        largest,
    )
    if differing or not largest <= ONNX_TOLERANCE:
        raise CliError(
            f"Export refused: ONNX Runtime and PyTorch disagree ({differing} answers differ, the "
            f"largest difference in a probability is {largest:.2e}, over {ONNX_TOLERANCE:.0e} is "
            f"refused). Nothing was written to {out}.",
            exit_code=1,
        )
    files.write_atomically(out, lambda file: file.write(file_bytes))
    accuracy = "" if test_accuracy is None else f", {test_accuracy:.3f} % test accuracy"
    logger.info(
        "Wrote {} ({:,} bytes): input 'image' [N, 1, 28, 28] pixels 0..1, outputs {}{}",
        out,
        len(file_bytes),
        ", ".join(f"'{name}'" for name in output_names(learned)),
        accuracy,
    )
    return 0
