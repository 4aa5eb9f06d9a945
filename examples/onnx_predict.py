"""Read photos of digits with the ONNX file that `mnist_recognition.py export` wrote: no torch, no
script, only `pip install onnxruntime numpy pillow`.

    python examples/onnx_predict.py outputs/lenet5_mnist.onnx my_digit.jpg [more.jpg ...]
    # my_digit.jpg: 7 99.7%        (or: 7 51.2% not sure; or: 4 99.1% not a digit, the 4 only a guess)

Its preparation is a simpler form of predict's (docs/export.md says what it leaves out): light ink
on a dark field as it is, and dark ink on light paper inverted, as predict decides (by the border's
median); the paper's level (the border's median) taken away; cropped to the ink; its longer side
20 pixels, its centre of mass at the centre of a 28x28 field.
"""

import json
import sys

import numpy as np
import onnxruntime
from PIL import Image


def prepare(path):
    """The image in `path` as the file's input: [1, 1, 28, 28], pixels 0..1, light on dark."""
    ink = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    if np.median(border_of(ink)) > 127:  # dark ink on light paper: inverted, as predict does
        ink = 255 - ink
    ink = np.clip(ink - np.median(border_of(ink)), 0, None)
    rows, cols = np.nonzero(ink > 0.2 * ink.max())
    ink = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] / ink.max()
    scale = 20 / max(ink.shape)
    size = (max(1, round(ink.shape[1] * scale)), max(1, round(ink.shape[0] * scale)))
    digit = Image.fromarray((ink * 255).astype(np.uint8)).resize(size, Image.Resampling.LANCZOS)
    weights = np.asarray(digit, dtype=np.float32)
    row_centre, col_centre = (np.indices(weights.shape) * weights).sum(axis=(1, 2)) / weights.sum()
    field = Image.new("L", (28, 28))
    field.paste(digit, (round(13.5 - col_centre), round(13.5 - row_centre)))
    return np.asarray(field, dtype=np.float32)[None, None] / 255


def border_of(pixels):
    """The pixels along the image's four edges: the paper, where the digit does not touch them."""
    return np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])


def read(session, path):
    """(class name, probability, verdict) of the digit in `path`: the verdict is "" (sure), "not sure"
    or "not a digit", from the thresholds in the file's metadata (files without them: always "")."""
    metadata = session.get_modelmeta().custom_metadata_map
    classes = json.loads(metadata["dataset"])["classes"]
    outputs = [output.name for output in session.get_outputs()]
    results = dict(zip(outputs, session.run(outputs, {"image": prepare(path)})))
    probabilities = results["probabilities"][0]
    verdict = ""
    if "not_a_digit" in results and results["not_a_digit"][0] > float(metadata["not_a_digit_above"]):
        verdict = "not a digit"
    elif probabilities.max() < float(metadata.get("unsure_below", 0)):
        verdict = "not sure"
    return classes[int(probabilities.argmax())], float(probabilities.max()), verdict


def main(onnx_file, *images):
    session = onnxruntime.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
    for path in images:
        name, probability, verdict = read(session, path)
        print(f"{path}: {name} {probability:.1%} {verdict}".rstrip())


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python examples/onnx_predict.py MODEL.onnx IMAGE [IMAGE ...]")
    main(*sys.argv[1:])
