"""Evaluation and figures: confusion matrix, mistakes, predictions; drawn without pyplot, so that
importing the script changes nothing global."""

import importlib.util

import matplotlib
import pytest
import torch
from conftest import SCRIPT
from PIL import Image

import mnist_recognition as app
from companions.reports import grids, report
from companions.training import devices

MNIST_DATA = app.DATASETS["mnist"]


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


def test_a_digit_grid_is_600_pixels_square_with_a_title_per_digit(tmp_path, monkeypatch):
    saved = []
    save = grids.save_figure
    monkeypatch.setattr(grids, "save_figure", lambda figure, path: (saved.append(figure), save(figure, path)))
    images = torch.zeros(16, 1, 28, 28)
    titles = [f"digit {index}" for index in range(16)]
    app.plot_digit_grid(images, titles, "the heading", tmp_path / "grid.png", MNIST_DATA)
    with Image.open(tmp_path / "grid.png") as image:
        assert image.format == "PNG" and image.size == (600, 600)
    [figure] = saved
    assert figure.get_suptitle() == "the heading"
    assert [axis.get_title() for axis in figure.axes] == titles  # in reading order, one above each image
    assert all(len(axis.get_images()) == 1 for axis in figure.axes)


def test_a_grid_of_fewer_images_leaves_the_other_places_empty(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(grids, "save_figure", lambda figure, path: saved.append(figure))
    app.plot_digit_grid(torch.zeros(3, 1, 28, 28), ["a", "b", "c"], "three", tmp_path / "grid.png", MNIST_DATA)
    [figure] = saved
    assert [axis.get_title() for axis in figure.axes] == ["a", "b", "c"] + [""] * 13
    assert [len(axis.get_images()) for axis in figure.axes] == [1] * 3 + [0] * 13


@pytest.mark.parametrize("epochs", [1, 3])
def test_training_curves_count_whole_epochs_from_the_start(epochs, tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(report, "save_figure", lambda figure, path: saved.append(figure))
    progress = app.Progress(shuffle_state=None)
    for epoch in range(1, epochs + 1):
        progress.logged_losses.append((epoch - 0.5, 1.0 / epoch))
        progress.history.append(
            {
                "epoch": epoch,
                "loss": 1.0 / epoch,
                "train_accuracy": 90 + epoch,
                "seconds": 1.0,
                "eval_loss": 0.5 / epoch,
                "eval_accuracy": 95 + epoch,
                "eval_seconds": 0.1,
            }
        )
    report.plot_training_curves(progress, "test", tmp_path / "curves.png")
    [figure] = saved
    figure.canvas.draw()
    for axis in figure.axes:
        ticks = [tick for tick in axis.get_xticks() if axis.get_xlim()[0] <= tick <= axis.get_xlim()[1]]
        assert all(float(tick).is_integer() for tick in ticks) and epochs in ticks
        if epochs == 1:
            assert axis.get_xlim()[0] == 0


@pytest.mark.parametrize(
    "flags, measured_on",
    [
        ([], ""),
        (["--recipe", "best"], "augmented images, label smoothing 0.1"),
        (["--label-smoothing", "0.2"], "label smoothing 0.2"),
    ],
)
def test_the_curves_say_what_the_train_values_were_measured_on(flags, measured_on, tmp_path, monkeypatch):
    """Augmented images and a smoothed loss put the train curves far from the test curves (a train
    loss five times the test loss in best): the titles say why."""
    assert report.training_measured_on(app.parse_args(flags)) == measured_on
    saved = []
    monkeypatch.setattr(report, "save_figure", lambda figure, path: saved.append(figure))
    progress = app.Progress(shuffle_state=None)
    progress.history.append(
        {
            "epoch": 1,
            "loss": 0.5,
            "train_accuracy": 90,
            "seconds": 1.0,
            "eval_loss": 0.1,
            "eval_accuracy": 99,
            "eval_seconds": 0.1,
        }
    )
    report.plot_training_curves(progress, "test", tmp_path / "curves.png", measured_on)
    [figure] = saved
    note = f"\n(train: {measured_on})" if measured_on else ""
    assert [axis.get_title() for axis in figure.axes] == [f"Loss{note}", f"Accuracy{note}"]


def test_display_pixels_undoes_the_normalisation():
    pixels = torch.rand(28, 28)
    for dataset in app.DATASETS.values():
        normalised = ((pixels - dataset.mean) / dataset.std).unsqueeze(0)
        torch.testing.assert_close(torch.from_numpy(grids.display_pixels(normalised, dataset)), pixels)


def evaluation_of(labels, predicted, confidence=None):
    confidence = torch.full((len(labels),), 0.5) if confidence is None else confidence
    return app.Evaluation("test", labels, predicted, confidence, loss=1.0, seconds=0.1)


def test_predictions_figure_counts_the_right_answers(tmp_path, monkeypatch):
    """The heading counts right answers; a wrong one is titled with the true label, in red."""
    images, labels = torch.zeros(20, 1, 28, 28), torch.arange(20) % 10
    chosen = app.sample_indices(20, seed=0)
    answers = labels.clone()
    answers[chosen[0]] = (labels[chosen[0]] + 1) % 10  # exactly one shown digit is answered wrong
    drawn = {}
    monkeypatch.setattr(
        app,
        "plot_digit_grid",
        lambda images, titles, heading, path, dataset, colors: drawn.update(
            titles=titles, heading=heading, colors=colors
        ),
    )
    app.plot_predictions((images, labels), evaluation_of(labels, answers), 0, tmp_path / "predictions.png", MNIST_DATA)
    assert drawn["heading"] == "Predictions on test images: 15 of 16 right"
    assert drawn["titles"][0] == f"pred {answers[chosen[0]].item()} (true {labels[chosen[0]].item()})"
    assert drawn["colors"] == ["red"] + ["black"] * 15


def test_the_confusion_matrix_counts_every_image_once_and_its_trace_is_the_accuracy():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (500,), generator=generator)
    predicted = torch.where(
        torch.rand(500, generator=generator) < 0.8, labels, torch.randint(0, 10, (500,), generator=generator)
    )
    evaluation = evaluation_of(labels, predicted)
    counts = evaluation.confusion_matrix()
    assert counts.sum() == 500 and 100 * counts.trace().item() / 500 == evaluation.accuracy
    assert counts[3, 5] == ((labels == 3) & (predicted == 5)).sum()
    assert evaluation.class_accuracy()[3] == pytest.approx(100 * counts[3, 3].item() / (labels == 3).sum().item())


def test_the_worst_mistakes_are_all_wrong_and_the_most_confident_first():
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    predicted = torch.tensor([0, 7, 2, 8, 9, 5])
    confidence = torch.tensor([0.99, 0.6, 0.98, 0.9, 0.7, 0.97])
    evaluation = evaluation_of(labels, predicted, confidence)
    assert evaluation.worst_mistakes() == [3, 4, 1]
    assert evaluation.worst_mistakes(how_many=2) == [3, 4]


def test_the_mistakes_figure_titles_each_wrong_answer_with_its_confidence(tmp_path, monkeypatch):
    labels, predicted = torch.tensor([4, 9, 1]), torch.tensor([4, 4, 7])
    evaluation = evaluation_of(labels, predicted, torch.tensor([0.9, 0.97, 0.55]))
    drawn = {}
    monkeypatch.setattr(
        report,
        "plot_digit_grid",
        lambda images, titles, heading, path, dataset, colors, title_size: drawn.update(
            titles=titles, heading=heading, count=len(images)
        ),
    )
    report.plot_mistakes((torch.zeros(3, 1, 28, 28), labels), evaluation, tmp_path / "mistakes.png", MNIST_DATA)
    assert drawn["titles"] == ["pred 4\n(true 9) 97.0 %", "pred 7\n(true 1) 55.0 %"] and drawn["count"] == 2
    assert drawn["heading"] == "The 2 most confident mistakes of 2 on test images"


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_leaves_the_model_in_the_mode_it_found(training):
    model = app.new_model(0, torch.device("cpu")).train(training)
    images, labels = torch.randn(30, 1, 28, 28), torch.arange(30) % 10
    evaluation = app.evaluate(model, (images, labels), "validation", devices.Runtime(torch.device("cpu")))
    assert model.training == training
    assert evaluation.split == "validation" and len(evaluation.labels) == 30
    with torch.no_grad():
        expected = model.eval()(images).argmax(1)
    assert torch.equal(evaluation.predicted, expected)  # computed in evaluation mode either way
