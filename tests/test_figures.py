"""Figures: drawn without pyplot, so that importing the script changes nothing global."""
import importlib.util

import matplotlib
import torch
from PIL import Image

import mnist_recognition as app
from conftest import SCRIPT


def test_importing_the_script_keeps_the_callers_matplotlib_backend():
    """`from mnist_recognition import LeNet5` in a notebook must not switch its backend."""
    previous = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        spec = importlib.util.spec_from_file_location("a_fresh_copy_of_the_script", SCRIPT)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(previous)


def test_a_digit_grid_is_600_pixels_square_with_a_title_per_digit(tmp_path):
    images = torch.zeros(16, 1, 28, 28)
    app.plot_digit_grid(images, [str(index) for index in range(16)], "heading", tmp_path / "grid.png")
    with Image.open(tmp_path / "grid.png") as image:
        assert image.format == "PNG" and image.size == (600, 600)


def test_display_pixels_undoes_the_normalisation():
    pixels = torch.rand(28, 28)
    normalised = ((pixels - app.MNIST_MEAN) / app.MNIST_STD).unsqueeze(0)
    torch.testing.assert_close(torch.from_numpy(app.display_pixels(normalised)), pixels)


def test_predictions_figure_counts_the_right_answers(tmp_path, monkeypatch):
    """The heading counts right answers; a wrong one is titled with the true label, in red."""
    images, labels = torch.zeros(20, 1, 28, 28), torch.arange(20) % 10
    chosen = app.sample_indices(20, seed=0)
    answers = labels.clone()
    answers[chosen[0]] = (labels[chosen[0]] + 1) % 10  # exactly one shown digit is answered wrong
    monkeypatch.setattr(app, "predict_classes", lambda model, batch: answers[chosen])
    drawn = {}
    monkeypatch.setattr(app, "plot_digit_grid", lambda images, titles, heading, path, colors: drawn.update(
        titles=titles, heading=heading, colors=colors))
    app.plot_predictions(torch.nn.Identity(), (images, labels), 0, tmp_path / "predictions.png")
    assert drawn["heading"] == "Predictions on test images: 15 of 16 right"
    assert drawn["titles"][0] == f"pred {answers[chosen[0]].item()} (true {labels[chosen[0]].item()})"
    assert drawn["colors"] == ["red"] + ["black"] * 15
