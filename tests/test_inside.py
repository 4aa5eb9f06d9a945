"""Inside a trained model: every layer's values, why it answered (checked by erasing ink), and the
figures that show them."""

import dataclasses
import json

import pytest
import torch
from conftest import LENET5_LAYER_SHAPES
from PIL import Image

import mnist_recognition as app
from companions.reports import inside
from companions.using.trained import load_trained_model

MNIST_DATA = app.DATASETS["mnist"]
CPU = torch.device("cpu")


def trained_data(trained):
    """The synthetic data folder that the `trained` fixture's model was trained on."""
    return json.loads((trained[0] / "metrics.json").read_text())["config"]["data_dir"]


def erasing_the_most_attributed_ink_hurts_more(model, image):
    _, most_attributed_erased, random_erased = inside.deletion_check(model, image, MNIST_DATA)
    return most_attributed_erased < random_erased


def test_each_layer_is_the_output_of_its_module_and_the_scores_are_the_models(trained):
    model, _ = load_trained_model(trained[0] / "lenet5_mnist.pt", CPU)
    image = app.normalised_split(trained_data(trained), MNIST_DATA, False, 1, CPU)[0][0]
    seen = inside.look_inside(model, image, MNIST_DATA)
    expected, x = {}, image.unsqueeze(0)
    with torch.no_grad():
        for index, name in ((0, "conv1"), (2, "pool1"), (3, "conv2"), (5, "pool2")):
            x = model.features[: index + 1](image.unsqueeze(0))
            expected[name] = x[0]
        flat = torch.flatten(model.features(image.unsqueeze(0)), 1)
        for index, name in ((0, "fc1"), (2, "fc2"), (4, "fc3")):
            expected[name] = model.classifier[: index + 1](flat)[0]
        scores = model(image.unsqueeze(0))[0]
    assert [name for name, _ in seen.layers] == ["input", *expected]
    assert torch.equal(seen.layers[0][1], image)
    for name, values in seen.layers[1:]:
        torch.testing.assert_close(values, expected[name], rtol=0, atol=1e-5, msg=name)
    torch.testing.assert_close(seen.scores, scores, rtol=0, atol=1e-5)
    assert seen.top == int(scores.argmax()) and seen.runner_up == int(scores.topk(2).indices[1])
    assert seen.attribution.shape == seen.contrast.shape == (28, 28)
    assert torch.equal(seen.filters, model.features[0].weight.detach()[:, 0])


def test_the_json_has_every_layer_in_forward_order_with_its_shape(trained):
    model, _ = load_trained_model(trained[0] / "lenet5_mnist.pt", CPU)
    image = app.normalised_split(trained_data(trained), MNIST_DATA, False, 1, CPU)[0][0]
    answer = inside.as_json(inside.look_inside(model, image, MNIST_DATA))
    shapes = {layer["name"]: layer["shape"] for layer in answer["layers"]}
    assert shapes == {"input": [1, 28, 28], **LENET5_LAYER_SHAPES}
    for layer in answer["layers"]:
        assert torch.tensor(layer["values"]).shape == tuple(layer["shape"]), layer["name"]
    assert torch.tensor(answer["layers"][1]["filters"]).shape == (6, 5, 5)
    assert torch.tensor(answer["attribution"]).shape == torch.tensor(answer["runner_up"]["attribution"]).shape
    assert answer["runner_up"]["class"] in range(10)


def test_erasing_the_ink_the_attribution_ranks_highest_lowers_the_answer_more_than_random_ink(trained):
    model, _ = load_trained_model(trained[0] / "lenet5_mnist.pt", CPU)
    images, _ = app.normalised_split(trained_data(trained), MNIST_DATA, False, 10, CPU)
    passed = [erasing_the_most_attributed_ink_hurts_more(model, image) for image in images]
    assert sum(passed) >= 9, passed


def test_the_deletion_check_fails_an_attribution_that_points_the_wrong_way(trained, monkeypatch):
    model, _ = load_trained_model(trained[0] / "lenet5_mnist.pt", CPU)
    images, _ = app.normalised_split(trained_data(trained), MNIST_DATA, False, 10, CPU)
    look = inside.look_inside
    monkeypatch.setattr(
        inside, "look_inside", lambda *args: dataclasses.replace(look(*args), attribution=-look(*args).attribution)
    )
    passed = [erasing_the_most_attributed_ink_hurts_more(model, image) for image in images]
    assert sum(passed) <= 5, passed  # far from the 9 of 10 that the true attribution must reach


@pytest.mark.slow
@pytest.mark.real_data
def test_on_real_test_digits_the_attribution_passes_the_deletion_check(real_mnist, real_fast):
    model, _ = load_trained_model(real_fast / "lenet5_mnist.pt", CPU)
    images, _ = app.normalised_split(real_mnist, MNIST_DATA, False, 10, CPU)
    passed = [erasing_the_most_attributed_ink_hurts_more(model, image) for image in images]
    assert sum(passed) >= 9, passed


@pytest.mark.slow
def test_the_figure_of_one_image_shows_every_layer(trained, tmp_path):
    model, _ = load_trained_model(trained[0] / "lenet5_mnist.pt", CPU)
    image = app.normalised_split(trained_data(trained), MNIST_DATA, False, 1, CPU)[0][0]
    inside.plot_inside(inside.look_inside(model, image, MNIST_DATA), tmp_path / "inside.png", MNIST_DATA, "a digit")
    inside.plot_filters(model, tmp_path / "filters.png")
    with Image.open(tmp_path / "inside.png") as figure, Image.open(tmp_path / "filters.png") as filters:
        assert figure.format == filters.format == "PNG"
        assert len(figure.convert("RGB").getcolors(maxcolors=1_000_000)) > 100  # maps, not a blank page


def test_a_mosaic_lays_maps_out_in_rows_with_gaps_between_them():
    maps = torch.arange(5 * 2 * 3, dtype=torch.float32).view(5, 2, 3).numpy()
    sheet = inside.mosaic(maps, columns=3)
    assert sheet.shape == (2 * 2 + 1, 3 * 3 + 2)
    assert (sheet[0:2, 4:7] == maps[1]).all() and (sheet[3:5, 4:7] == maps[4]).all()
    assert torch.isnan(torch.from_numpy(sheet[2])).all() and torch.isnan(torch.from_numpy(sheet[3:5, 8:11])).all()


def test_one_image_of_each_class_is_the_first_of_it():
    labels = torch.tensor([3, 1, 3, 0, 1, 2]).numpy()
    assert inside.first_of_each_class(labels, 4) == [3, 1, 5, 0]
    assert inside.first_of_each_class(labels, 5) == [3, 1, 5, 0]  # a class without images has none
