"""export: a trained model as one self-contained ONNX file, checked with ONNX Runtime before it is written;
or the same file quantized to int8; or one HTML page that runs the model in a browser, offline.

    python mnist_recognition.py export --checkpoint outputs/lenet5_mnist.pt   # -> outputs/lenet5_mnist.onnx
    python mnist_recognition.py export --int8     # -> outputs/lenet5_mnist.int8.onnx
    python mnist_recognition.py export --html     # -> outputs/lenet5_mnist.html (companions/sharing/offline_page.py)

The file takes 0..1 pixels (the dataset's normalisation is inside the graph) and gives logits,
calibrated probabilities (the model's temperature is inside too) and, where the model has a
detector, its "not a digit" score; its metadata says how to prepare an image and where the
thresholds of "not sure" and "not a digit" lie (docs/export.md).
"""

import json
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from loguru import logger

import mnist_recognition as trainer
from companions.reports import report
from companions.sharing import offline_page
from companions.training import files
from companions.training.augment import generator_for
from companions.training.command_line import INT8_TOLERANCE, ONNX_TOLERANCE
from companions.training.dataset_files import TEST_FILES, TRAIN_FILES, has_files, raw_dir
from companions.training.errors import CliError
from companions.using import prepare
from companions.using.serve import describe_model
from companions.using.trained import doubt_of, trained_model

RANDOM_CHECK_IMAGES = 1000  # checked instead of the test set when its files are not on disk
CALIBRATION_IMAGES = 1000  # training images that ONNX Runtime's static quantization calibrates on
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


def onnx_probabilities(file_bytes, pixels):
    """ONNX Runtime's probabilities for the file and 0..1 pixels, batch by batch."""
    import onnxruntime  # only the checks need it

    session = onnxruntime.InferenceSession(file_bytes, providers=["CPUExecutionProvider"])
    return np.concatenate(
        [session.run(["probabilities"], {"image": batch.numpy()})[0] for batch in pixels.split(trainer.EVAL_BATCH_SIZE)]
    )


def compare_with_onnx_runtime(file_bytes, expected, pixels):
    """(answers that differ, the largest difference in a probability) between ONNX Runtime
    running the file and PyTorch's `expected` probabilities."""
    probabilities, expected = onnx_probabilities(file_bytes, pixels), expected.numpy()
    return int((probabilities.argmax(1) != expected.argmax(1)).sum()), float(np.abs(probabilities - expected).max())


# ----------------------------------------------------------------------------------------------
# int8: ONNX Runtime's static quantization, calibrated on training images
# ----------------------------------------------------------------------------------------------


def calibration_pixels(data_dir, dataset):
    """CALIBRATION_IMAGES training images (0..1 pixels), drawn with a fixed seed."""
    if not has_files(data_dir, dataset, TRAIN_FILES):
        raise CliError(
            f"export --int8 calibrates on {dataset.title}'s training images, which are not in "
            f"{raw_dir(data_dir, dataset)}: give --data-dir, or train there first."
        )
    pixels, _ = trainer.pixel_split(data_dir, dataset, True, None)
    chosen = torch.randperm(len(pixels), generator=generator_for(0, "int8"))[:CALIBRATION_IMAGES]
    return pixels[chosen]


def int8_bytes(float_bytes, calibration, metadata):
    """The float file quantized by ONNX Runtime (QDQ, int8 weights per channel and activations),
    its ranges calibrated on `calibration`; the metadata kept, and the quantization said."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"image": batch.numpy()} for batch in calibration.split(100)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "float.onnx").write_bytes(float_bytes)
        quant_pre_process(str(folder / "float.onnx"), str(folder / "prepared.onnx"), skip_symbolic_shape=True)
        quantize_static(str(folder / "prepared.onnx"), str(folder / "int8.onnx"), Batches(),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8)  # fmt: skip
        graph = onnx.load(str(folder / "int8.onnx"))
    # What only debugging needs goes: torch's notes on each node (its source lines) and the inferred
    # shapes of intermediate values, which ONNX Runtime infers again.
    for node in graph.graph.node:
        del node.metadata_props[:]
    del graph.graph.value_info[:]
    del graph.metadata_props[:]
    quantized = f"int8 (ONNX Runtime's static quantization, calibrated on {len(calibration)} training images)"
    for key, value in (metadata | {"quantization": quantized}).items():
        graph.metadata_props.add(key=key, value=value)
    return graph.SerializeToString()


def check_int8(file_bytes, expected, pixels, labels, described):
    """Refuses the int8 file where its test accuracy is more than INT8_TOLERANCE points below the
    float model's (or, without the test set, where it gives another answer on over 1 % of the images)."""
    probabilities = onnx_probabilities(file_bytes, pixels)
    answers, float_answers = probabilities.argmax(1), expected.numpy().argmax(1)
    differing = int((answers != float_answers).sum())
    if labels is None:
        logger.info("int8 against float on {}: {} answers differ", described, differing)
        if differing > len(answers) / 100:
            raise CliError(f"Export refused: the int8 file answers {differing} of {len(answers)} images otherwise.", 1)
        return None
    accuracy = 100 * float((answers == labels.numpy()).mean())
    float_accuracy = 100 * float((float_answers == labels.numpy()).mean())
    logger.info("int8 against float on {}: {:.3f} % against {:.3f} % test accuracy, {} answers differ",
                described, accuracy, float_accuracy, differing)  # fmt: skip
    if accuracy < float_accuracy - INT8_TOLERANCE:
        raise CliError(
            f"Export refused: the int8 file's test accuracy, {accuracy:.3f} %, is more than {INT8_TOLERANCE} points "
            f"below the float model's {float_accuracy:.3f} %. Nothing was written.",
            exit_code=1,
        )
    return accuracy


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def default_out(args):
    suffix = ".html" if args.html else ".int8.onnx" if args.int8 else ".onnx"
    return args.checkpoint.with_name(args.checkpoint.stem + suffix)


def command(args):
    """Export, check, then write; exit code 1 (and no file) where ONNX Runtime disagrees."""
    out = args.out or default_out(args)
    files.prepare_folder(out.parent)
    if args.html and out.exists() and not offline_page.made_by_export(out):
        raise CliError(f"{out} exists and is not a page that export wrote; it was left as it is. Give another --out.")
    model, payload, dataset = trained_model(args, torch.device("cpu"))
    learned = doubt_of(payload, args.checkpoint, torch.device("cpu"))
    model = model.to(memory_format=torch.contiguous_format)  # the plain layout, as the file stores it
    if args.html:
        described = f"{describe_model(args.checkpoint, payload, dataset)}; this page runs it in your browser, offline"
        return write_page(out, model, learned, dataset, described)
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
    metadata = onnx_metadata(payload, dataset, test_accuracy, learned)
    file_bytes = onnx_bytes(model, dataset, learned, metadata)
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
    if args.int8:
        float_size = len(file_bytes)
        file_bytes = int8_bytes(file_bytes, calibration_pixels(args.data_dir, dataset), metadata)
        test_accuracy = check_int8(file_bytes, expected, pixels, labels, described)
        logger.info("int8: {:,} bytes, {:.2f} of the float file's {:,}", len(file_bytes),
                    len(file_bytes) / float_size, float_size)  # fmt: skip
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


def write_page(out, model, learned, dataset, description):
    """export --html: the page, written atomically."""
    page = offline_page.page_html(model, learned, dataset, description).encode()
    files.write_atomically(out, lambda file: file.write(page))
    logger.info(
        "Wrote {} ({:,} bytes): open it in a browser, no server and no network needed; it holds the model's "
        "weights{}, and runs them in JavaScript",
        out,
        len(page),
        " and its 'not a digit' detector" if learned.detector is not None else "",
    )
    return 0
