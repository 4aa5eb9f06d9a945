"""companions/doubt/non_digits.py: the families of images that are not digits, made as predict prepares images."""

import pytest
import torch

from companions.doubt import non_digits
from companions.training.augment import generator_for


def some_digits(count=64):
    """Stand-ins for a dataset's digits: an upright bar of ink in the 20-pixel box and a crossbar at a
    height of its own, with labels."""
    pixels = torch.zeros(count, 1, 28, 28)
    pixels[:, :, 4:24, 12:15] = 1.0
    for index in range(count):
        row = 5 + index % 17
        pixels[index, :, row : row + 2, 8 : 12 + index % 8] = 1.0
    return pixels, torch.arange(count) % 10


@pytest.mark.parametrize("name", list(non_digits.FAMILIES))
def test_each_family_is_placed_as_predict_places_a_digit(name):
    images = non_digits.make([name], 40, generator_for(name), some_digits())
    assert images.shape == (40, 1, 28, 28) and images.min() >= 0 and images.max() <= 1
    mass = images.sum((1, 2, 3))
    assert (mass > 5).all()  # every image has ink
    coordinates = torch.arange(28) + 0.5
    rows = (images.sum(3).squeeze(1) * coordinates).sum(1) / mass
    cols = (images.sum(2).squeeze(1) * coordinates).sum(1) / mass
    assert ((rows - 14).abs() <= 1.5).all() and ((cols - 14).abs() <= 1.5).all()  # centre of mass centred
    longer = longer_sides(images)
    assert (longer <= 22).all()  # in the 20-pixel box, give or take the resampling
    assert (longer >= 15).float().mean() > 0.9


def longer_sides(images):
    """The longer side of each image's ink (pixels above 0.2), from its first row or column to its last."""
    inked = images.squeeze(1) > 0.2
    index = torch.arange(28)

    def span(rows):
        return torch.where(rows, index, -1).amax(1) - torch.where(rows, index, 28).amin(1) + 1

    return torch.maximum(span(inked.any(2)), span(inked.any(1)))


@pytest.mark.parametrize("name", list(non_digits.FAMILIES))
def test_a_seed_makes_the_same_images(name):
    first = non_digits.make([name], 8, generator_for(0), some_digits())
    again = non_digits.make([name], 8, generator_for(0), some_digits())
    other = non_digits.make([name], 8, generator_for(1), some_digits())
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_objects_take_only_the_drawn_families_and_fill_the_field():
    assert set(non_digits.families_for("object")) == set(non_digits.DRAWN)
    images = non_digits.make(["zigzags"], 20, generator_for(0), None, kind="object")
    assert (longer_sides(images) >= 26).all()


def test_prepared_crops_scales_and_centres_ink_anywhere():
    image = torch.zeros(1, 1, 56, 84)
    image[0, 0, 10:20, 60:80] = 1.0  # a block 20 wide and 10 high, far off centre
    placed = non_digits.prepared(image)
    inked = placed[0, 0] > 0.5
    assert inked.any(0).sum() == 20 and 9 <= inked.any(1).sum() <= 11
    rows, cols = inked.nonzero().float().mean(0)
    assert abs(rows - 13.5) <= 1 and abs(cols - 13.5) <= 1
