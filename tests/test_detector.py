"""companions/doubt/detector.py: the "not a digit" network, how it learns, and its threshold."""

import json

import pytest
import torch

import mnist_recognition as app
from companions.doubt import detector, non_digits
from companions.training.augment import generator_for

MNIST_DATA = app.DATASETS["mnist"]
CPU = torch.device("cpu")


@pytest.mark.parametrize("aim", [0.005, 0.01, 0.05])
def test_the_threshold_flags_at_most_its_aim_of_the_held_out_images(aim):
    scores = torch.randn(5000, generator=torch.Generator().manual_seed(2))
    threshold = detector.threshold_for(scores, aim)
    assert (scores > threshold).float().mean() <= aim < (scores >= threshold).float().mean() + 1e-3


@pytest.mark.parametrize("widths", [(6, 12, 48), detector.RECIPE["widths"]])
def test_a_detector_is_rebuilt_from_its_weights_at_whatever_widths_it_was_learned(widths):
    learned = detector.Detector(widths)
    rebuilt = detector.Detector.from_state(learned.state_dict())
    images = torch.randn(3, 1, 28, 28)
    assert torch.equal(learned(images), rebuilt(images))


def synthetic_training_split(trained):
    data_dir = json.loads((trained[0] / "metrics.json").read_text())["config"]["data_dir"]
    return app.normalised_split(data_dir, MNIST_DATA, True, None, CPU)


@pytest.mark.slow
def test_learning_a_detector_leaves_torchs_seed_as_it_was_and_is_the_same_every_time(trained):
    images, labels = synthetic_training_split(trained)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first, first_scores = detector.train_detector(images, labels, MNIST_DATA, ["blobs", "zigzags"], steps=5)
    assert torch.equal(torch.get_rng_state(), state)
    again, again_scores = detector.train_detector(images, labels, MNIST_DATA, ["blobs", "zigzags"], steps=5)
    assert torch.equal(first_scores, again_scores)
    assert len(first_scores) == detector.held_out_count(len(labels)) == len(labels) // 10


@pytest.mark.slow
def test_the_detector_tells_made_non_digits_from_digits_it_did_not_learn_from(trained):
    """On the synthetic digits (drawn in fonts), a detector flags most of the families' images made
    with another seed, and at most its aim of the held-out digits."""
    images, labels = synthetic_training_split(trained)
    network, held_out = detector.train_detector(images, labels, MNIST_DATA, steps=300)
    threshold = detector.threshold_for(held_out)
    digits = (images[:200] * MNIST_DATA.std + MNIST_DATA.mean, labels[:200])
    others = non_digits.make(list(non_digits.FAMILIES), 50, generator_for("other images"), digits)
    scores = detector.scores_of(network, others.sub(MNIST_DATA.mean).div(MNIST_DATA.std))
    assert (scores > threshold).float().mean() > 0.8
    assert (held_out > threshold).float().mean() <= detector.RECIPE["aim"]
