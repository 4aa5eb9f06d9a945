"""companions/using/prepare.py: photos, scans and drawings made into the network's 28x28 input, as MNIST was made."""

import dataclasses
import random
import shutil

import numpy as np
import pytest
import torch
from conftest import draw_digit, off_centre, paper_digit, real_dataset_folder
from PIL import Image, ImageDraw, ImageFilter

import mnist_recognition as app
from companions.using import prepare

MNIST_DATA = app.DATASETS["mnist"]

# --- preprocessing -------------------------------------------------------------------------------


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
    """An independent oracle for the script's centre_of_mass, which the centring relies on."""
    rows, cols = np.indices(pixels.shape)
    return (rows * pixels).sum() / pixels.sum(), (cols * pixels).sum() / pixels.sum()


def network_pixels(path):
    """What the network sees of an image file, back in 0..1 pixels."""
    _, network_input = prepare.read_image(path, MNIST_DATA)
    assert network_input.shape == (1, 28, 28)
    return network_input[0].numpy() * MNIST_DATA.std + MNIST_DATA.mean


@pytest.mark.parametrize("case", list(CASES) + ["jpeg"])
def test_preprocessing_makes_a_centred_light_on_dark_28x28_digit(case, tmp_path):
    path = tmp_path / ("digit.jpg" if case == "jpeg" else "digit.png")
    image = paper_digit(6).convert("RGB") if case == "jpeg" else CASES[case]()
    image.save(path)
    pixels = network_pixels(path)
    assert pixels.max() > 0.9  # light ink
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    assert border.max() < 0.1  # on a dark field
    ink_rows, ink_cols = np.nonzero(pixels > 0.2)
    assert max(np.ptp(ink_rows), np.ptp(ink_cols)) + 1 <= 21  # longer side about 20 pixels
    row, col = centre_of_mass(pixels)
    assert abs(row - 13.5) <= 1 and abs(col - 13.5) <= 1


def mean_difference(first, second):
    return float(np.abs(first - second).mean())


def test_preprocessing_is_pixel_for_pixel_the_same_wherever_and_however_the_digit_is_drawn(tmp_path):
    """The same digit, dark on white in the middle of a page, or light on black in a corner of a
    larger one, becomes the same 28x28 input, pixel for pixel; a mirrored or shifted digit does not."""
    digit = paper_digit(2, size=200)
    digit.save(tmp_path / "centred.png")
    dark = Image.eval(digit, lambda value: 255 - value)
    off_centre(dark, canvas=(900, 700), at=(650, 450), paper=0).save(tmp_path / "corner.png")
    centred, corner = network_pixels(tmp_path / "centred.png"), network_pixels(tmp_path / "corner.png")
    assert np.abs(centred - corner).max() < 1e-6

    digit.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / "mirrored.png")
    mirrored = network_pixels(tmp_path / "mirrored.png")
    assert mean_difference(mirrored, np.fliplr(centred)) < 0.02  # centring may round to the other pixel
    assert mean_difference(mirrored, centred) > 0.05


def test_preprocessing_an_already_prepared_digit_changes_it_little_pixel_for_pixel(tmp_path):
    paper_digit(8, size=300).save(tmp_path / "digit.png")
    once = network_pixels(tmp_path / "digit.png")
    twice = prepare.prepare_like_mnist(Image.fromarray((once * 255).round().astype(np.uint8)), MNIST_DATA)
    assert mean_difference(once, twice) < 0.01  # a shift of one pixel costs 0.03 to 0.08


def test_light_falling_unevenly_across_a_photo_is_taken_away_with_the_paper(tmp_path):
    """Paper lit from one side (a gradient of 120 levels across it) gives the digit of evenly lit
    paper, not a grey box around it."""
    digit = np.asarray(paper_digit(3, size=200), dtype=np.float32)
    even = off_centre(Image.fromarray(digit.astype(np.uint8)), canvas=(400, 300), at=(120, 50))
    page = np.asarray(even, dtype=np.float32) - np.linspace(0, 120, 400)[None, :]  # darker toward the right
    uneven = Image.fromarray(np.clip(page, 0, 255).astype(np.uint8))
    prepared_even, prepared_uneven = (
        prepare.prepare_like_mnist(even, MNIST_DATA),
        prepare.prepare_like_mnist(uneven, MNIST_DATA),
    )
    assert mean_difference(prepared_even, prepared_uneven) < 0.02
    assert prepared_uneven[:, :4].max() < 0.05 and prepared_uneven[:, -4:].max() < 0.05  # no paper left at the sides


def test_the_grain_of_a_photo_is_taken_away_with_the_paper():
    """Grey paper with a camera's noise all over the page (its specks far from the digit) gives the
    digit of clean paper at its full 20 pixels, not a smaller one in a grey box."""
    digit = np.asarray(paper_digit(3, size=200), dtype=np.float32) / 255
    clean = (
        np.asarray(
            off_centre(Image.fromarray((digit * 255).astype(np.uint8)), canvas=(600, 500), at=(120, 50)),
            dtype=np.float32,
        )
        / 255
    )
    photo = 60 + 140 * clean + np.random.default_rng(0).normal(0, 8, size=clean.shape)  # ink 60, paper 200
    noisy = Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8))
    prepared_clean = prepare.prepare_like_mnist(Image.fromarray((clean * 255).astype(np.uint8)), MNIST_DATA)
    prepared_noisy = prepare.prepare_like_mnist(noisy, MNIST_DATA)
    ink_rows, ink_cols = np.nonzero(prepared_noisy > 0.2)
    assert max(np.ptp(ink_rows), np.ptp(ink_cols)) + 1 in (20, 21)
    assert np.corrcoef(prepared_clean.ravel(), prepared_noisy.ravel())[0, 1] > 0.99  # the same digit, a little dimmer
    assert prepared_noisy[prepared_clean == 0].max() < 0.05  # and no grey box of paper around it
    # Clean paper has no grain: its digit is as it was without the step.
    without_grain = prepare.Steps(grain_floor=0)
    assert np.array_equal(
        prepare.prepare_like_mnist(Image.fromarray((clean * 255).astype(np.uint8)), MNIST_DATA, without_grain),
        prepared_clean,
    )


def test_a_border_of_two_halves_is_prepared_without_an_error():
    """A page whose border is half black and half white (a sheet on a dark desk, cut in the middle)
    has no paper level that its median stands for: the preparation takes the median and goes on,
    where it used to answer with numpy's words about a zero-size array."""
    page = np.zeros((120, 120), dtype=np.uint8)
    page[:, 60:] = 255
    page[30:90, 20:30] = 160  # a stroke on the dark half
    for image in (page, page.T):
        pixels = prepare.prepared_pixels(Image.fromarray(image), MNIST_DATA)
        assert pixels.shape == (28, 28) and np.isfinite(pixels).all() and pixels.max() > 0.9


# --- stroke width ------------------------------------------------------------------------------------


def pen_digit(pen_width, size=280):
    """A 4 drawn with a round pen of one width, dark on white, about 200 px tall (as on the page)."""
    image = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(image)
    for stroke in ([(170, 40), (60, 170), (210, 170)], [(170, 40), (170, 240)]):
        draw.line(stroke, fill=0, width=pen_width, joint="curve")
        for x, y in stroke:
            draw.ellipse((x - pen_width / 2, y - pen_width / 2, x + pen_width / 2, y + pen_width / 2), fill=0)
    return image


def width_at_20_px(gray):
    return prepare.stroke_width(np.asarray(prepare.resized(prepare.foreground(gray), 20), dtype=np.float32))


def test_stroke_width_of_a_bar_is_its_width():
    for width in (2, 3, 5):
        bar = np.zeros((110, 20), dtype=np.float32)
        bar[5:105, 5 : 5 + width] = 1  # 100 pixels long: its ends add little to the outline
        assert prepare.stroke_width(bar) == pytest.approx(width, rel=0.06)


WITHOUT_STROKE_WIDTHS = dataclasses.replace(MNIST_DATA, stroke_widths=None)  # the preparation before it


def test_strokes_as_wide_as_mnists_are_left_exactly_as_they_were():
    """A 28-px pen on the page's 280-px canvas makes MNIST-like strokes: the preparation is the old one."""
    drawn = pen_digit(28)
    low, high = MNIST_DATA.stroke_widths
    assert low <= width_at_20_px(drawn) <= high
    assert np.array_equal(
        prepare.prepare_like_mnist(drawn, MNIST_DATA), prepare.prepare_like_mnist(drawn, WITHOUT_STROKE_WIDTHS)
    )


@pytest.mark.parametrize("pen_width", [4, 70])
def test_much_thinner_or_wider_strokes_are_brought_to_mnists_width(pen_width):
    drawn = pen_digit(pen_width)
    low, high = MNIST_DATA.stroke_widths
    before = width_at_20_px(drawn)
    assert before < low if pen_width < 28 else before > high
    prepared = prepare.prepare_like_mnist(drawn, MNIST_DATA)
    after = prepare.stroke_width(prepared)
    nearer_end = low if pen_width < 28 else high  # as little change as brings it among MNIST's widths
    assert abs(after - nearer_end) < 0.3 < abs(before - nearer_end)
    old = prepare.prepare_like_mnist(drawn, WITHOUT_STROKE_WIDTHS)
    mnist_like = prepare.prepare_like_mnist(pen_digit(28), MNIST_DATA)
    assert abs(prepared.sum() - mnist_like.sum()) < abs(old.sum() - mnist_like.sum())  # ink nearer MNIST's
    ink_rows, ink_cols = np.nonzero(prepared > 0.2)
    assert max(np.ptp(ink_rows), np.ptp(ink_cols)) + 1 in (20, 21)  # still 20 pixels on its longer side
    assert abs(centre_of_mass(prepared)[0] - 13.5) <= 1 and abs(centre_of_mass(prepared)[1] - 13.5) <= 1


def test_a_dataset_without_known_stroke_widths_keeps_every_stroke():
    drawn = pen_digit(70)
    kmnist = app.DATASETS["kmnist"]
    assert kmnist.stroke_widths is None
    assert np.array_equal(
        prepare.prepare_like_mnist(drawn, kmnist), prepare.prepare_like_mnist(drawn, WITHOUT_STROKE_WIDTHS)
    )


@pytest.mark.slow
@pytest.mark.real_data
def test_mnists_stroke_widths_and_its_photographed_digits(tmp_path):
    """The widths in the DATASETS table are MNIST's own, and MNIST's test digits photographed (enlarged,
    dark on light, blurred) come out of the preparation as before, but for its own rare extremes."""
    folder = real_dataset_folder("mnist", "MNIST")
    shutil.copytree(folder, tmp_path / "MNIST" / "raw")
    app.prepare_files(tmp_path, MNIST_DATA, allow_download=False)
    train_images, _ = app.raw_split(tmp_path, MNIST_DATA, train=True)
    chosen = np.random.default_rng(0).choice(len(train_images), 10_000, replace=False)
    widths = [width_at_20_px(Image.fromarray(255 - train_images[i].numpy())) for i in chosen]
    assert tuple(np.percentile(widths, [1, 99]).round(2)) == MNIST_DATA.stroke_widths
    test_images, _ = app.raw_split(tmp_path, MNIST_DATA, train=False)
    unchanged = 0
    for image in test_images[:300]:
        large = Image.fromarray(image.numpy()).resize((280, 280), Image.Resampling.BICUBIC)
        photo = Image.eval(large.filter(ImageFilter.GaussianBlur(2)), lambda value: 255 - value)
        unchanged += np.array_equal(
            prepare.prepare_like_mnist(photo, MNIST_DATA), prepare.prepare_like_mnist(photo, WITHOUT_STROKE_WIDTHS)
        )
    assert unchanged >= 290  # 297 of 300 when measured; MNIST's own 1st and 99th percentiles lie outside


def test_a_clothing_photo_is_prepared_as_fashion_mnist_was_made(tmp_path):
    """Trimmed to the object, its longer side 28 pixels, centred, light on dark."""
    photo = Image.new("L", (400, 300), 235)  # a light background
    photo.paste(40, (150, 60, 250, 260))  # a dark object 100 x 200 pixels, off-centre
    photo.save(tmp_path / "coat.png")
    _, network_input = prepare.read_image(tmp_path / "coat.png", app.DATASETS["fashion-mnist"])
    fashion = app.DATASETS["fashion-mnist"]
    pixels = network_input[0].numpy() * fashion.std + fashion.mean
    rows, cols = np.nonzero(pixels > 0.5)
    assert (rows.min(), rows.max()) == (0, 27)  # the longer side fills the field
    assert 13 <= cols.max() - cols.min() + 1 <= 15  # the shorter side keeps the aspect ratio
    assert abs((cols.min() + cols.max()) / 2 - 13.5) <= 1  # centred
    assert pixels[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].min() > 0.5  # light object on dark
    digit_input = prepare.prepare_like_mnist(Image.open(tmp_path / "coat.png").convert("L"), MNIST_DATA)
    assert np.ptp(np.nonzero(digit_input > 0.5)[0]) + 1 <= 21  # MNIST's own way would leave it 20 pixels tall


def test_the_published_sentence_names_each_step_that_runs():
    """The ONNX file's `preparation` is made from the steps: one left out is not described."""
    every_step = prepare.describe(MNIST_DATA)
    assert "plane fitted" in every_step and "grain" in every_step and "1.07-3.61 pixels" in every_step
    assert "20 pixels" in every_step and "centre of mass" in every_step
    assert "grain" not in prepare.describe(MNIST_DATA, prepare.Steps(grain_floor=0))
    assert "strokes" not in prepare.describe(MNIST_DATA, prepare.Steps(match_strokes=False))
    assert "median" in prepare.describe(MNIST_DATA, prepare.Steps(light="median"))
    assert "strokes" not in prepare.describe(app.DATASETS["kmnist"])  # no known widths: none are changed
    clothes = prepare.describe(app.DATASETS["fashion-mnist"])
    assert "object" in clothes and "28 pixels" in clothes and "strokes" not in clothes


def test_an_image_already_as_mnists_are_reaches_the_network_unchanged(tmp_path):
    """A digit prepared once and saved as a 28x28 PNG is read back pixel for pixel; the same digit a
    few pixels off centre, or dark on light, is prepared again."""
    paper_digit(4, size=300).save(tmp_path / "digit.png")
    once = network_pixels(tmp_path / "digit.png")
    as_png = Image.fromarray((once * 255).round().astype(np.uint8))
    assert np.array_equal(prepare.prepared_pixels(as_png, MNIST_DATA), np.asarray(as_png, dtype=np.float32) / 255)
    moved = Image.fromarray(np.roll(np.asarray(as_png), 4, axis=1))
    assert prepare.as_in_dataset(moved, MNIST_DATA) is None
    assert prepare.as_in_dataset(Image.eval(as_png, lambda value: 255 - value), MNIST_DATA) is None


@pytest.mark.slow
@pytest.mark.real_data
def test_mnists_own_test_images_saved_as_png_reach_the_network_as_evaluate_gives_them(tmp_path):
    """predict over MNIST's test images as PNG files answers as evaluate does: the same inputs, bit for bit."""
    folder = real_dataset_folder("mnist", "MNIST")
    shutil.copytree(folder, tmp_path / "MNIST" / "raw")
    app.prepare_files(tmp_path, MNIST_DATA, allow_download=False)
    images, _ = app.raw_split(tmp_path, MNIST_DATA, train=False)
    as_evaluate_gives_them, _ = app.normalised_split(tmp_path, MNIST_DATA, False, None, torch.device("cpu"))
    for index in range(0, 10_000, 7):  # every 7th: 1,429 images
        path = tmp_path / "digit.png"
        Image.fromarray(images[index].numpy()).save(path)
        _, network_input = prepare.read_image(path, MNIST_DATA)
        assert torch.equal(network_input, as_evaluate_gives_them[index].contiguous()), index
