"""A photo, scan or drawing turned into the 28x28 pixels the network was trained on.

MNIST's digits were made by cropping each digit to its ink, scaling its longer side to 20 pixels
and placing its centre of mass at the centre of a 28x28 field; Fashion-MNIST's objects were
trimmed, scaled to 28 pixels and centred. An image from outside the dataset is cleaned first:
made grayscale and light on dark, the background's light and the paper's grain taken away, and
(for digits) strokes far from the dataset's usual widths brought toward them.

This file knows images, numpy and Pillow only. Its errors say what is wrong with an image; the
callers decide what that means to them (a logged line for predict, a status code for serve).
"""

import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError


class ImageError(Exception):
    """An image that cannot be prepared; the message says why."""


class UnreadableImage(ImageError):
    """Not an image file that Pillow can read: missing, empty, damaged or of another kind."""


class ImageTooLarge(ImageError):
    """More pixels than Pillow's limit: a decompression bomb, or a photo far larger than needed."""


class NoInk(ImageError):
    """An image with nothing on it that stands out from its background."""


# ----------------------------------------------------------------------------------------------
# The steps, and the numbers they work with
# ----------------------------------------------------------------------------------------------

MIN_INK_CONTRAST = 40  # of 255: below this the image is taken to be blank
PAPER_SPREAD = 30  # of 255: border pixels further than this from its median are not paper (ink touching the edge)
# Paper and sensor grain (noise, JPEG, texture) as far as this many of its standard deviations is
# taken away with the paper: else specks far from the digit widen its crop, and it comes out small.
GRAIN_FLOOR = 4
MAX_STROKE_STEPS = 24  # erosions or dilations at 80 px: enough for a stroke half as wide as the digit is tall


@dataclass(frozen=True)
class Steps:
    """Which clean-up steps run, and how hard. The defaults are what predict, serve and export's
    metadata use; benchmarks/handwriting.py turns them off one by one to show what each adds."""

    light: str = "plane"  # the background's level: "plane" fitted to the border's paper, or "median" of the border
    grain_floor: float = GRAIN_FLOOR  # the paper's grain taken away, in its standard deviations; 0: none
    match_strokes: bool = True  # bring strokes outside the dataset's usual widths to the nearer end


STEPS = Steps()


def describe(dataset, steps=STEPS):
    """The preparation in one sentence, for people who prepare images in other code (the ONNX
    file's metadata); made from the same steps that the code below takes."""
    thing = "digit" if dataset.image_kind == "digit" else "object"
    light = "a plane fitted to the paper along the border" if steps.light == "plane" else "the border's median level"
    grain = (
        f" and the paper's grain (up to {steps.grain_floor:g} robust standard deviations of the border's paper)"
        if steps.grain_floor
        else ""
    )
    parts = [
        f"Make the image grayscale (transparency on white), light {thing} on dark (inverted when its border is light)",
        f"subtract the background's light ({light}){grain}",
        f"crop it to the {'ink' if thing == 'digit' else 'object'}",
    ]
    if thing == "digit":
        if steps.match_strokes and dataset.stroke_widths:
            low, high = dataset.stroke_widths
            parts.append(
                f"thin or thicken strokes whose width at the 20-pixel size is outside {low:g}-{high:g} pixels "
                "(the dataset's 1st to 99th percentile) toward the nearer end"
            )
        parts.append(
            "scale it so that its longer side is 20 pixels, and place it in a 28x28 field with its "
            "centre of mass at the centre; pixels 0..1."
        )
    else:
        parts.append("scale it so that its longer side is 28 pixels, and centre it in a 28x28 field; pixels 0..1.")
    return ", ".join(parts[:-1]) + ", " + parts[-1]


# ----------------------------------------------------------------------------------------------
# Reading the file
# ----------------------------------------------------------------------------------------------

IMAGE_OPENING = threading.Lock()


def open_grayscale(source):
    """The image in `source` (a path or a binary file object) as 8-bit grayscale, transparency
    composited on white."""
    if isinstance(source, Path):
        if not source.is_file():
            raise UnreadableImage("no such file")
        if source.stat().st_size == 0:
            raise UnreadableImage("the file is empty")
    try:
        # Image.open reads the header and checks the pixel count; catch_warnings changes a setting
        # of the whole process, so threads (serve's) take turns here.
        with IMAGE_OPENING, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(source)
        with image:
            ImageOps.exif_transpose(image, in_place=True)
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                rgba = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
                return rgba.convert("L")
            return image.convert("L")
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ImageTooLarge(f"the image is too large (over {Image.MAX_IMAGE_PIXELS:,} pixels)") from None
    except UnidentifiedImageError:
        raise UnreadableImage("not an image file that can be read") from None
    except (OSError, ValueError, SyntaxError) as error:  # a damaged file fails in PIL's decoders in these ways
        raise UnreadableImage(f"the image cannot be read ({error})") from None


# ----------------------------------------------------------------------------------------------
# The ink: light on dark, without the paper's light and grain, cropped
# ----------------------------------------------------------------------------------------------


def foreground(gray, steps=STEPS):
    """The object of a photo or scan as 0..1 pixels, light on dark, cropped to it."""
    return cropped(ink_of(gray, steps))


def ink_of(gray, steps=STEPS):
    """The whole image's ink (or object) above the paper, light on dark, in 0..255 levels: inverted
    when the border (the background) is light, the background's light and the paper's grain
    subtracted; raises NoInk where nothing stands out."""
    pixels = np.asarray(gray, dtype=np.float32)
    if np.median(border_of(pixels)) > 127:  # dark on light paper: invert
        pixels = 255 - pixels
    light = background_light(pixels) if steps.light == "plane" else np.median(border_of(pixels))
    above_paper = pixels - light
    ink = np.maximum(above_paper - steps.grain_floor * grain(above_paper), 0)
    if ink.max() < MIN_INK_CONTRAST:
        raise NoInk("no ink or object found; the image looks blank")
    return ink


def border_of(pixels):
    """The pixels along the image's four edges, in one row."""
    return np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])


def background_light(pixels):
    """The background's level at every pixel: a plane fitted to the border's paper, so that light
    falling unevenly across a photo is taken away too. A flat border gives its median."""
    height, width = pixels.shape
    border = border_of(pixels)
    # Each border pixel's row and column, in border_of's order: top, bottom, left, right.
    rows = np.concatenate([np.zeros(width), np.full(width, height - 1), np.arange(height), np.arange(height)])
    cols = np.concatenate([np.arange(width), np.arange(width), np.zeros(height), np.full(height, width - 1)])
    level = np.median(border)
    near = np.abs(border - level) <= PAPER_SPREAD
    if not near.any() or np.ptp(border[near]) == 0:
        return level  # flat, or no paper that the median stands for (a border of two halves): nothing to fit
    design = np.stack([np.ones(near.sum()), rows[near], cols[near]], axis=1)
    (constant, per_row, per_col), *_ = np.linalg.lstsq(design, border[near], rcond=None)
    return (constant + per_row * np.arange(height)[:, None] + per_col * np.arange(width)).astype(np.float32)


def grain(above_paper):
    """How much the paper varies from pixel to pixel around its fitted light: the standard deviation
    of the border's paper, measured robustly (from the median absolute deviation). 0 for a clean
    drawing or render."""
    border = border_of(above_paper)
    deviations = np.abs(border - np.median(border))
    paper = deviations[deviations <= PAPER_SPREAD]
    return 1.4826 * np.median(paper) if paper.size else 0.0


def cropped(ink):
    """Ink scaled to 0..1, cropped to the rows and columns where it is above 0.2."""
    ink = ink / ink.max()
    inked = ink > 0.2
    rows, cols = np.flatnonzero(inked.any(1)), np.flatnonzero(inked.any(0))
    return ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def resized(pixels, longer_side):
    """0..1 pixels scaled so that their longer side is `longer_side`, as an 8-bit image."""
    scale = longer_side / max(pixels.shape)
    size = (max(1, round(pixels.shape[1] * scale)), max(1, round(pixels.shape[0] * scale)))
    return lanczos(Image.fromarray((pixels * 255).astype(np.uint8)), size)


def lanczos(image, size):
    """The image resampled to `size` with Pillow's Lanczos filter, its width first, then its height:
    one pass per axis in a fixed order (Pillow chooses the order itself when both change), so that
    export --html's page can do exactly the same."""
    return image.resize((size[0], image.height), Image.Resampling.LANCZOS).resize(size, Image.Resampling.LANCZOS)


# ----------------------------------------------------------------------------------------------
# Stroke width: a felt pen or a heavy scan made thinner, a fine pen thicker
# ----------------------------------------------------------------------------------------------


def stroke_width(pixels):
    """About how wide a digit's strokes are, in pixels: twice its area over the length of its
    outline (a stroke w wide and L long covers about wL and has an outline about 2L long), the ink
    being the pixels above half the brightest."""
    ink = np.pad(pixels > 0.5 * pixels.max(), 1)
    outline = np.count_nonzero(ink[1:] != ink[:-1]) + np.count_nonzero(ink[:, 1:] != ink[:, :-1])
    return 2 * ink.sum() / max(outline, 1)


def with_strokes_like(ink, widths):
    """Cropped ink whose strokes, measured at the 20-px size, are as wide as the dataset's usually
    are (widths: its 1st and 99th percentile), unchanged. Other ink is eroded (or dilated) step by
    step with a 3x3 grey-scale filter at four times that size, each step about half a pixel at
    20 px, and the step whose width comes nearest the range's nearer end is kept: as little change
    as brings it among the dataset's own. Erosion stops before it takes away more than half of the
    ink: strokes would break."""
    low, high = widths
    width = stroke_width(np.asarray(resized(ink, 20), dtype=np.float32))
    if low <= width <= high:
        return ink
    target = high if width > high else low
    step = ImageFilter.MinFilter(3) if width > high else ImageFilter.MaxFilter(3)
    large = resized(ink, 80)
    area = np.count_nonzero(np.asarray(large) > 127)
    best, best_distance = None, abs(width - target)
    for _ in range(MAX_STROKE_STEPS):
        large = large.filter(step)
        if np.count_nonzero(np.asarray(large) > 127) < area / 2:
            break
        # Measured at the same scale, without cropping again: the width the strokes have now.
        small = lanczos(large, (max(1, large.width // 4), max(1, large.height // 4)))
        distance = abs(stroke_width(np.asarray(small, dtype=np.float32)) - target)
        if distance >= best_distance:
            break
        best, best_distance = large, distance
    return ink if best is None else cropped(np.asarray(best, dtype=np.float32))


# ----------------------------------------------------------------------------------------------
# Placed in the 28x28 field as the dataset was made
# ----------------------------------------------------------------------------------------------


def prepare_like_mnist(gray, dataset, steps=STEPS):
    """As MNIST was made: the digit light on dark, strokes as wide as the dataset's (where its widths
    are known), its longer side 20 px, its centre of mass at the centre of a 28x28 field. Returns
    28x28 pixels in 0..1."""
    return placed_like_mnist(foreground(gray, steps), dataset, steps)


def placed_like_mnist(ink, dataset, steps=STEPS):
    """Cropped 0..1 ink (one digit) in a 28x28 field as MNIST's digits are: strokes as wide as the
    dataset's, its longer side 20 px, its centre of mass at the centre."""
    if steps.match_strokes and dataset.stroke_widths:
        ink = with_strokes_like(ink, dataset.stroke_widths)
    digit = resized(ink, 20)
    row_centre, col_centre = centre_of_mass(np.asarray(digit, dtype=np.float32) / 255)
    field = Image.new("L", (28, 28))
    field.paste(digit, (round(13.5 - col_centre), round(13.5 - row_centre)))
    return np.asarray(field, dtype=np.float32) / 255


def prepare_like_fashion_mnist(gray, dataset, steps=STEPS):
    """As Fashion-MNIST was made: the object light on dark, trimmed to it, its longer side 28 px,
    centred in a 28x28 field. Returns 28x28 pixels in 0..1."""
    item = resized(foreground(gray, steps), 28)
    field = Image.new("L", (28, 28))
    field.paste(item, ((28 - item.width) // 2, (28 - item.height) // 2))
    return np.asarray(field, dtype=np.float32) / 255


def centre_of_mass(pixels):
    rows, cols = np.indices(pixels.shape)
    total = pixels.sum()
    return (rows * pixels).sum() / total, (cols * pixels).sum() / total


PREPARE_BY_KIND = {"digit": prepare_like_mnist, "object": prepare_like_fashion_mnist}


def as_in_dataset(gray, dataset):
    """The image's 0..1 pixels, unchanged, where it is already as the dataset's own images are (one
    of them saved as a PNG file, say): 28x28, light on a dark border, its ink's longer side as the
    dataset makes it (19 to 21 pixels for a digit, 26 to 28 for an object), a digit's centre of mass
    near the centre. Else None: preparing it again would change it."""
    if gray.size != (28, 28):
        return None
    pixels = np.asarray(gray, dtype=np.float32) / 255
    inked = pixels > 0
    if not inked.any() or np.median(border_of(pixels)) > (0.05 if dataset.image_kind == "digit" else 0.5):
        return None
    rows, cols = np.flatnonzero(inked.any(1)), np.flatnonzero(inked.any(0))
    longer = max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)
    if dataset.image_kind != "digit":
        return pixels if longer >= 26 else None
    row_centre, col_centre = centre_of_mass(pixels)
    centred = max(abs(row_centre - 13.5), abs(col_centre - 13.5)) <= 1.5
    return pixels if 19 <= longer <= 21 and centred else None


def prepared_pixels(gray, dataset, steps=STEPS):
    """The 28x28 0..1 pixels that the network sees of a grayscale image: as they are where the image
    is already as the dataset's own are, else prepared as the dataset was made; raises NoInk where
    there is nothing to see."""
    pixels = as_in_dataset(gray, dataset)
    return pixels if pixels is not None else PREPARE_BY_KIND[dataset.image_kind](gray, dataset, steps)


def normalised(pixels, dataset):
    """28x28 0..1 pixels as the network's 1 x 28 x 28 input, normalised like the training data."""
    return torch.from_numpy(pixels).sub(dataset.mean).div(dataset.std).unsqueeze(0)


def read_image(source, dataset, steps=STEPS):
    """(the original grayscale image, the network's 1 x 28 x 28 input) for one image file (a path
    or a binary file object); raises an ImageError."""
    gray = open_grayscale(source)
    return gray, normalised(prepared_pixels(gray, dataset, steps), dataset)
