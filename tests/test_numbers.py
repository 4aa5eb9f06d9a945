"""companions/using/numbers.py: the digits of a whole number found in one image, in reading order,
joined where a digit is in pieces and cut where digits touch. The model comes in as a judge: here
stand-ins that say what each test needs."""

import random

import numpy as np
import pytest
from conftest import digits_side_by_side, draw_digit
from PIL import Image, ImageDraw

import mnist_recognition as app
from companions.using import numbers, prepare

MNIST_DATA = app.DATASETS["mnist"]


def every_part_a_digit(pixel_arrays):
    """A judge that reads everything well as a digit."""
    return [0.0] * len(pixel_arrays), [True] * len(pixel_arrays)


def nothing_a_digit(pixel_arrays):
    """A judge that calls nothing a digit."""
    return [-20.0] * len(pixel_arrays), [False] * len(pixel_arrays)


def strokes(size, lines, width=10):
    """Black lines of `width` on a white image of `size`."""
    image = Image.new("L", size, 255)
    pen = ImageDraw.Draw(image)
    for line in lines:
        pen.line(line, fill=0, width=width)
    return image


def test_digits_with_gaps_are_found_left_to_right_each_in_its_own_box():
    image = digits_side_by_side([4, 7, 2])
    found = numbers.digits_in(image, MNIST_DATA, every_part_a_digit)
    assert len(found.pieces) == 3 and found.unread == 0
    lefts = [piece.box[0] for piece in found.pieces]
    assert lefts == sorted(lefts)
    for index, piece in enumerate(found.pieces):
        x0, y0, x1, y1 = piece.box
        assert 20 + 120 * index <= x0 < x1 <= 20 + 120 * (index + 1) and 20 <= y0 < y1 <= 140
        assert piece.pixels.shape == (28, 28) and not piece.small and not piece.cut_from_one


def test_each_digit_is_prepared_as_the_same_digit_alone_would_be():
    """A digit cut out of a number reaches the network as it would in an image of its own."""
    image = digits_side_by_side([3, 8])
    found = numbers.digits_in(image, MNIST_DATA, every_part_a_digit)
    for piece in found.pieces:
        x0, y0, x1, y1 = piece.box
        alone = image.crop((x0 - 20, y0 - 20, x1 + 20, y1 + 20))
        np.testing.assert_array_equal(piece.pixels, prepare.prepared_pixels(alone, MNIST_DATA))


@pytest.mark.parametrize("judge", [every_part_a_digit, nothing_a_digit])
def test_an_image_of_one_digit_is_prepared_whole_as_it_always_was(judge):
    image = draw_digit(5, random.Random(3), size=200, ink=0, paper=255)
    found = numbers.digits_in(image, MNIST_DATA, judge)
    assert len(found.pieces) == 1 and found.pieces[0].box == (0, 0, 200, 200)
    np.testing.assert_array_equal(found.pieces[0].pixels, prepare.prepared_pixels(image, MNIST_DATA))


def test_a_dataset_image_and_a_fashion_mnist_image_are_one_piece():
    dataset_digit = Image.fromarray((255 * numbers_free_digit()).astype(np.uint8))
    assert len(numbers.digits_in(dataset_digit, MNIST_DATA, every_part_a_digit).pieces) == 1
    two_shoes = digits_side_by_side([1, 1])
    assert len(numbers.digits_in(two_shoes, app.DATASETS["fashion-mnist"], every_part_a_digit).pieces) == 1


def numbers_free_digit():
    """A 28x28 digit as the dataset holds one: light on black, 20 px high, centred."""
    pixels = np.zeros((28, 28))
    pixels[4:24, 12:16] = 1.0
    return pixels


def test_a_blank_image_has_no_ink():
    with pytest.raises(prepare.NoInk):
        numbers.digits_in(Image.new("L", (300, 100), 255), MNIST_DATA, every_part_a_digit)


def test_a_digit_in_pieces_is_joined():
    """A 5 whose flag is a stroke of its own, and a 4 broken in two one above the other, next to a 1."""
    five_and_four = strokes(
        (420, 200),
        [
            ((40, 60), (40, 100), (80, 100), (95, 130), (80, 160), (40, 160)),  # a 5's body
            ((50, 45), (100, 45)),  # its flag, apart from it
            ((200, 40), (180, 110), (240, 110)),  # a 4's upper half
            ((230, 60), (230, 100)),
            ((230, 125), (230, 170)),  # its lower half, apart
            ((340, 40), (340, 170)),  # a 1
        ],
    )
    found = numbers.digits_in(five_and_four, MNIST_DATA, every_part_a_digit)
    assert [piece.box[0] < 150 for piece in found.pieces] == [True, False, False]
    assert len(found.pieces) == 3 and not any(piece.small for piece in found.pieces)


def test_a_dot_between_digits_is_small():
    image = strokes((400, 200), [((60, 40), (60, 170)), ((130, 160), (136, 160)), ((220, 40), (220, 170))], width=14)
    found = numbers.digits_in(image, MNIST_DATA, every_part_a_digit)
    assert [piece.small for piece in found.pieces] == [False, True, False]


def test_more_than_thirty_pieces_are_read_up_to_thirty_and_the_rest_counted():
    bars = [((20 + 30 * index, 30), (20 + 30 * index, 90)) for index in range(42)]
    found = numbers.digits_in(strokes((1300, 120), bars, width=8), MNIST_DATA, every_part_a_digit)
    assert len(found.pieces) == numbers.MAX_PIECES and found.unread == 42 - numbers.MAX_PIECES
    assert found.pieces[0].box[0] < found.pieces[-1].box[0] < 20 + 30 * 30


# --- digits that touch -----------------------------------------------------------------------------


def two_bars_joined():
    """Two tall bars joined at the bottom: one piece of ink, wider than one bar."""
    return strokes((200, 200), [((50, 30), (50, 170)), ((110, 30), (110, 170)), ((50, 168), (110, 168))], width=8)


def judge_by_width(pixel_arrays):
    """A judge that reads a narrow part (one bar) well and anything wider badly, as a model would read
    a 1 and the bars joined."""
    widths = [np.ptp(np.flatnonzero(pixels.max(0) > 0.2)) for pixels in pixel_arrays]
    return [0.0 if width <= 6 else -8.0 for width in widths], [width <= 6 for width in widths]


def test_digits_that_touch_are_cut_where_each_part_reads_best():
    found = numbers.digits_in(two_bars_joined(), MNIST_DATA, judge_by_width)
    assert len(found.pieces) == 2 and all(piece.cut_from_one for piece in found.pieces)
    (left, _, left_end, _), (right_start, _, right, _) = (piece.box for piece in found.pieces)
    assert left < 50 and left_end <= right_start and right > 110


def test_one_piece_of_ink_read_as_a_digit_is_never_cut():
    found = numbers.digits_in(two_bars_joined(), MNIST_DATA, every_part_a_digit)
    assert len(found.pieces) == 1 and found.pieces[0].box == (0, 0, 200, 200)


def test_one_piece_of_ink_is_cut_only_into_digits():
    """The only piece of an image that the model calls no digit stays whole unless every part is one."""
    found = numbers.digits_in(two_bars_joined(), MNIST_DATA, nothing_a_digit)
    assert len(found.pieces) == 1 and found.pieces[0].box == (0, 0, 200, 200)


def test_the_best_parts_add_up_to_the_most_and_each_part_costs():
    scores = {(0, 1): 0.0, (1, 2): 0.0, (2, 3): 0.0, (0, 2): -5.0, (1, 3): -5.0, (0, 3): -9.0}
    assert numbers.best_parts(3, scores) == [(0, 1), (1, 2), (2, 3)]
    scores[(0, 2)] = 0.0  # as good as its two halves: fewer parts win
    assert numbers.best_parts(3, scores) == [(0, 2), (2, 3)]
    assert numbers.best_parts(3, {(0, 3): -9.0, (0, 1): 0.0}) == [(0, 3)]  # no way through the parts


def test_cuts_go_down_the_columns_that_cross_the_least_ink():
    ink = prepare.ink_of(two_bars_joined())
    labels, (group,) = numbers.joined_pieces(ink)
    cuts = numbers.candidate_cuts(labels, group)
    assert all(len(cut) == group.box[3] - group.box[1] for cut in cuts)
    assert [cut.mean() for cut in cuts] == sorted(cut.mean() for cut in cuts)
    straight = [cut[0] for cut in cuts if (cut == cut[0]).all()]
    assert 1 <= len(straight) <= numbers.CUTS and all(54 < column < 106 for column in straight)  # between the bars
