"""companions/doubt/real_digits.py: the dataset's digits changed as paper, pens and scanners change them."""

import torch
from test_non_digits import longer_sides, some_digits

from companions.doubt import real_digits
from companions.training.augment import generator_for


def test_changed_digits_are_placed_as_predict_places_a_digit_and_a_seed_makes_the_same():
    pixels, _ = some_digits(64)
    changed = real_digits.as_they_arrive(pixels, generator_for(0))
    assert changed.shape == pixels.shape and changed.min() >= 0 and changed.max() <= 1
    assert (changed.sum((1, 2, 3)) > 5).all()  # the ink is still there
    assert (longer_sides(changed) <= 22).all() and (longer_sides(changed) >= 15).float().mean() > 0.9
    assert torch.equal(changed, real_digits.as_they_arrive(pixels, generator_for(0)))
    assert not torch.equal(changed, real_digits.as_they_arrive(pixels, generator_for(1)))


def test_each_change_does_what_it_says():
    image = torch.zeros(2, 1, 56, 56)
    image[:, :, 10:46, 26:30] = 1.0  # a bar four pixels wide
    wider, thinner = real_digits.with_pen(image, torch.tensor([2, -1]))
    assert (wider[0, 20] > 0.5).sum() == 8 and (thinner[0, 20] > 0.5).sum() == 2
    blurred = real_digits.blurred(image, torch.tensor([0, 2]))
    assert torch.equal(blurred[0], image[0]) and 0 < blurred[1, 0, 20, 25] < 1
    blocky = real_digits.low_resolution(image, generator_for(0))
    assert blocky.shape == image.shape and not torch.equal(blocky, image)
    gapped = real_digits.broken(image, generator_for(0))
    assert gapped.sum() < image.sum() and (gapped <= image).all()
