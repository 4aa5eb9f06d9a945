"""companions/doubt/verdicts.py and trust.py: the temperature, the "not sure" threshold, the verdicts."""

import json
import math

import pytest
import torch
import torch.nn as nn

import mnist_recognition as app
from companions.doubt import trust, verdicts
from companions.using.trained import doubt_of, load_trained_model

MNIST_DATA = app.DATASETS["mnist"]
CPU = torch.device("cpu")


def synthetic_split(trained, train):
    data_dir = json.loads((trained[0] / "metrics.json").read_text())["config"]["data_dir"]
    return app.normalised_split(data_dir, MNIST_DATA, train, None, CPU)


def test_calibration_lowers_the_ece_of_a_model_made_overconfident_on_purpose(trained):
    model, _ = load_trained_model(trained[0] / "lenet5_mnist.pt", CPU)
    with torch.no_grad():  # every score five times as large: the same answers, far too sure of them
        model.classifier[-1].weight.mul_(5)
        model.classifier[-1].bias.mul_(5)
    train_set, test_set = synthetic_split(trained, True), synthetic_split(trained, False)
    learned = verdicts.learn_doubt(model, *train_set, MNIST_DATA, seed=0)
    measured = trust.measure_trust(model, learned, *test_set, "test")
    assert learned.temperature > 2
    assert measured.summary()["ece"] < measured.summary()["ece_before"] / 2


def test_the_temperature_undoes_a_scaling_of_the_scores():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(10, (4000,), generator=generator)
    logits = torch.randn(4000, 10, generator=generator)
    logits[torch.arange(4000), labels] += 2.5
    temperature = verdicts.fit_temperature(logits, labels)
    assert verdicts.fit_temperature(logits * 3, labels) == pytest.approx(3 * temperature, rel=1e-3)


@pytest.mark.parametrize("aim", [0.003, 0.01, 0.1])
def test_the_unsure_threshold_flags_at_most_its_aim_of_the_right_answers(aim):
    generator = torch.Generator().manual_seed(1)
    probabilities = torch.softmax(4 * torch.randn(5000, 10, generator=generator), 1)
    labels = torch.randint(10, (5000,), generator=generator)
    threshold = verdicts.unsure_threshold(probabilities, labels, aim)
    confidence, predicted = probabilities.max(1)
    right = confidence[predicted == labels]
    assert (right < threshold).float().mean() <= aim
    assert (right <= threshold).float().mean() > aim - 1 / len(right)  # the lowest such: one more would flag more


class FixedScores(nn.Module):
    """A stand-in detector whose score for every image is the image's first pixel."""

    def forward(self, images):
        return images[:, 0, 0, 0]


def test_each_verdict_comes_from_its_own_threshold():
    learned = verdicts.Doubt(temperature=2.0, unsure_below=0.6, detector=FixedScores(), not_a_digit_above=0.5)
    logits = torch.tensor([[8.0, 0, 0, 0, 0, 0, 0, 0, 0, 0], [2.0, 0, 0, 0, 0, 0, 0, 0, 0, 0], [8.0] + [0.0] * 9])
    images = torch.zeros(3, 1, 28, 28)
    images[2, 0, 0, 0] = 1.0  # the third is unlike a digit
    probabilities, scores, codes = learned.verdicts(logits, images)
    torch.testing.assert_close(probabilities, torch.softmax(logits / 2, 1))
    assert [verdicts.VERDICTS[v] for v in codes] == ["sure", "not_sure", "not_a_digit"]
    assert scores.tolist() == [0.0, 0.0, 1.0]


def test_a_model_file_keeps_its_doubt_and_an_older_one_says_it_has_none(trained, tmp_path, capsys):
    payload = torch.load(trained[0] / "lenet5_mnist.pt", weights_only=True)
    learned = doubt_of(payload, trained[0] / "lenet5_mnist.pt", CPU)
    assert learned.temperature == payload["doubt"]["temperature"] and learned.detector is not None
    assert math.isfinite(learned.not_a_digit_above)
    del payload["doubt"]
    older = doubt_of(payload, tmp_path / "old.pt", CPU)
    assert (older.temperature, older.unsure_below, older.detector) == (1.0, verdicts.OLD_UNSURE_BELOW, None)


def test_learning_the_doubt_leaves_the_model_and_torchs_seed_as_they_were(trained):
    model, payload = load_trained_model(trained[0] / "lenet5_mnist.pt", CPU)
    kept = doubt_of(payload, trained[0] / "lenet5_mnist.pt", CPU)
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    torch.manual_seed(123)
    state = torch.get_rng_state()
    learned = verdicts.learn_doubt(model, *synthetic_split(trained, True), MNIST_DATA, 0, kept.detector, 1.5)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(weights[name], tensor) for name, tensor in model.state_dict().items())
    assert learned.detector is kept.detector and learned.not_a_digit_above == 1.5


def test_fitted_on_the_plain_training_images_a_model_is_never_made_surer(trained, monkeypatch):
    """Where augmented images are far harder for a model, its temperature comes from the images it
    learned; a fit below 1 there would only say how well it learned them, and is not trusted."""
    model, _ = load_trained_model(trained[0] / "lenet5_mnist.pt", CPU)
    images, labels = synthetic_split(trained, True)

    def sure_of_training_images(model, plain, augmented, labels):
        logits = torch.zeros(len(labels), 10)
        logits[torch.arange(len(labels)), labels] = 1.0  # right, and far less sure than right answers deserve
        return logits, "training images (augmented ones are far harder for this model)"

    monkeypatch.setattr(verdicts, "calibration_logits", sure_of_training_images)
    learned = verdicts.learn_doubt(model, images, labels, MNIST_DATA, seed=0)
    assert learned.temperature == 1.0 and "not trusted" in learned.calibrated_on
    monkeypatch.setattr(
        verdicts, "calibration_logits", lambda *args: (sure_of_training_images(*args)[0], verdicts.AUGMENTED)
    )
    assert verdicts.learn_doubt(model, images, labels, MNIST_DATA, seed=0).temperature < 1
