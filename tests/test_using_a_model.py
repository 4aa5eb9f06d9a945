"""Using a trained model: evaluate a checkpoint, read handwriting, refuse unsafe checkpoints."""
import json
import pickle
import random
import re
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import mnist_recognition as app
from conftest import TEST_COUNT, draw_digit, run_cli


# --- preprocessing -------------------------------------------------------------------------------

def paper_digit(digit, seed=0, size=300, **kwargs):
    """A dark digit on light paper, like a photo or scan of handwriting."""
    return draw_digit(digit, random.Random(seed), size=size, ink=kwargs.pop("ink", 0),
                      paper=kwargs.pop("paper", 255), **kwargs)


def off_centre(image, canvas=(640, 480), at=(60, 150), paper=255):
    page = Image.new(image.mode, canvas, paper)
    page.paste(image, at)
    return page


def rgba_on_transparent(digit):
    """A black digit on a fully transparent background, as paint programs save it."""
    ink = draw_digit(digit, random.Random(2), size=200, ink=255, paper=0)
    image = Image.new("RGBA", ink.size, (0, 0, 0, 0))
    image.putalpha(ink)
    return image


CASES = {
    "large black on white": lambda: paper_digit(4, size=500),
    "off-centre": lambda: off_centre(paper_digit(2, size=200)),
    "rgb ink on cream": lambda: paper_digit(5, ink=(30, 30, 140), paper=(250, 245, 225), mode="RGB"),
    "rgba transparent": lambda: rgba_on_transparent(7),
    "light on dark": lambda: draw_digit(3, random.Random(3), size=120, ink=230, paper=20),
}


def centre_of_mass(pixels):
    rows, cols = np.indices(pixels.shape)
    return (rows * pixels).sum() / pixels.sum(), (cols * pixels).sum() / pixels.sum()


@pytest.mark.parametrize("case", list(CASES) + ["jpeg"])
def test_preprocessing_makes_a_centred_light_on_dark_28x28_digit(case, tmp_path):
    path = tmp_path / ("digit.jpg" if case == "jpeg" else "digit.png")
    image = paper_digit(6).convert("RGB") if case == "jpeg" else CASES[case]()
    image.save(path)
    _, network_input = app.read_handwriting(path)
    assert network_input.shape == (1, 28, 28)
    pixels = network_input[0].numpy() * app.MNIST_STD + app.MNIST_MEAN
    assert pixels.max() > 0.9  # light ink
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    assert border.max() < 0.1  # on a dark field
    ink_rows, ink_cols = np.nonzero(pixels > 0.2)
    assert max(np.ptp(ink_rows), np.ptp(ink_cols)) + 1 <= 21  # longer side about 20 pixels
    row, col = centre_of_mass(pixels)
    assert abs(row - 13.5) <= 1 and abs(col - 13.5) <= 1


def test_preprocessing_of_an_mnist_digit_changes_little(synthetic_data):
    """An MNIST-like digit is already light on dark, centred and about 20 pixels tall."""
    images, _ = app.load_split(synthetic_data, False, 5, torch.device("cpu"))
    for image in images:
        pixels = (image[0] * app.MNIST_STD + app.MNIST_MEAN).clamp(0, 1).numpy()
        again = app.mnist_like(Image.fromarray((pixels * 255).astype(np.uint8)))
        assert abs(again.mean() - pixels.mean()) < 0.1


# --- predict -------------------------------------------------------------------------------------

def test_predict_recognises_generated_digits(trained, tmp_path):
    paths = []
    for digit in range(10):
        paths.append(tmp_path / f"digit{digit}.png")
        draw_digit(digit, random.Random(100 + digit), size=28, ink=0, paper=255).resize((140, 140)).save(paths[-1])
    result = run_cli("predict", *paths, "--checkpoint", trained[0] / "lenet5_mnist.pt", "--json")
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    assert [answer["file"] for answer in answers] == [str(path) for path in paths]
    for answer in answers:
        assert len(answer["probabilities"]) == 10 and abs(sum(answer["probabilities"]) - 1) < 1e-4
        assert answer["probability"] == max(answer["probabilities"])
    correct = sum(answer["digit"] == digit for digit, answer in enumerate(answers))
    assert correct >= 8, answers


def test_predict_prints_a_line_per_image_and_draws_a_figure(trained, tmp_path):
    path = tmp_path / "seven.png"
    paper_digit(7).save(path)
    figure = tmp_path / "show.png"
    result = run_cli("predict", path, "--checkpoint", trained[0] / "lenet5_mnist.pt", "--show", figure)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(rf"{re.escape(str(path))}: \d \(\d+\.\d %\), then \d \(\d+\.\d %\), \d \(\d+\.\d %\)\n",
                        result.stdout)
    with Image.open(figure) as image:
        assert image.format == "PNG" and image.size[0] > 500


def test_predict_reports_a_figure_it_cannot_write(trained, tmp_path):
    path = tmp_path / "one.png"
    paper_digit(1).save(path)
    result = run_cli("predict", path, "--checkpoint", trained[0] / "lenet5_mnist.pt",
                     "--show", tmp_path / "no" / "such" / "folder" / "show.png")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "Cannot write" in result.stderr
    assert result.stdout.startswith(str(path))  # the prediction itself was still printed


def huge_png(path):
    """A valid PNG whose header claims 100000 x 100000 pixels: a decompression bomb."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", 100_000, 100_000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


BAD_INPUTS = {
    "not an image": (lambda path: path.write_text("just some text"), "not an image"),
    "empty": (lambda path: path.write_bytes(b""), "empty"),
    "blank page": (lambda path: Image.new("RGB", (300, 200), "white").save(path), "no ink"),
    "too large": (huge_png, "too large"),
    "missing": (lambda path: None, "no such file"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_get_one_line_and_the_rest_are_still_predicted(case, trained, tmp_path):
    make_bad, reason = BAD_INPUTS[case]
    bad, good = tmp_path / "bad.png", tmp_path / "good.png"
    make_bad(bad)
    paper_digit(1).save(good)
    result = run_cli("predict", bad, good, "--checkpoint", trained[0] / "lenet5_mnist.pt", "--json")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and str(bad) in errors[0] and reason in errors[0]
    assert [answer["file"] for answer in json.loads(result.stdout)] == [str(good)]


# --- evaluate ------------------------------------------------------------------------------------

def test_evaluate_reproduces_the_accuracy_recorded_by_training(trained, synthetic_data, tmp_path):
    out_dir, _ = trained
    recorded = torch.load(out_dir / "lenet5_mnist.pt", weights_only=True)["test_accuracy"]
    result = run_cli("evaluate", "--checkpoint", out_dir / "lenet5_mnist.pt", "--data-dir", synthetic_data,
                     "--no-download", "--out-dir", tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"Accuracy of the network on the {TEST_COUNT} test images: {recorded:.3f} %" in result.stderr
    with Image.open(tmp_path / "predictions.png") as image:
        assert image.size == (600, 600)


# --- unsafe or unusable checkpoints --------------------------------------------------------------

class CreatesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def malicious(path, tmp_path):
    torch.save({"model": CreatesAFile(tmp_path / "pwned")}, path)


def truncated(path, trained):
    path.write_bytes((trained / "lenet5_mnist.pt").read_bytes()[:5000])


def foreign(path, _):
    torch.save({"weights": torch.zeros(3)}, path)


def tampered(path, trained):
    payload = torch.load(trained / "lenet5_mnist.pt", weights_only=True)
    payload["model"]["features.0.weight"] = torch.zeros(6, 1, 3, 3)
    torch.save(payload, path)


def raw_pickle(path, tmp_path):
    path.write_bytes(pickle.dumps(CreatesAFile(tmp_path / "pwned")))


@pytest.mark.parametrize("make", [malicious, truncated, foreign, tampered, raw_pickle, None])
def test_bad_checkpoints_are_refused_and_nothing_in_them_runs(make, trained, tmp_path):
    checkpoint = tmp_path / "model.pt"
    if make is not None:
        make(checkpoint, trained[0] if make in (truncated, tampered) else tmp_path)
    digit = tmp_path / "digit.png"
    paper_digit(1).save(digit)
    result = run_cli("predict", digit, "--checkpoint", checkpoint)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert str(checkpoint) in result.stderr
    assert not (tmp_path / "pwned").exists()
