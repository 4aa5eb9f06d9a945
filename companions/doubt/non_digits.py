"""Images that are not of the dataset's kind, made on the spot: what the detector learns "not a digit"
(or "not clothing") from, and what benchmarks/not_a_digit.py holds out one family at a time.

Each family draws a batch of 28x28 images, 0..1, light on dark, placed in the field as predict
prepares a drawing or photo (companions/using/prepare.py): a digit's ink cropped, its longer side scaled
to 20 pixels, its centre of mass at the centre; an object's longer side scaled to 28 pixels,
centred. Strokes are drawn as a pen draws them: polylines of a round pen, 1.5 to 4 pixels wide.
Every family draws all its random numbers from the generator it is given, so that a seed makes
the same images on every machine.
"""

import math
from pathlib import Path

import torch
import torch.nn.functional as F

FIELD = 28
PEN_WIDTHS = (1.5, 4.0)  # a stroke's width after the preparation, in pixels of the 28x28 field


# ----------------------------------------------------------------------------------------------
# Drawing: polylines with a round pen, then placed in the field as the preparation places ink
# ----------------------------------------------------------------------------------------------


def uniform(shape, low, high, generator):
    return low + (high - low) * torch.rand(shape, generator=generator)


def drawn(points, pen_down, widths):
    """Polylines as ink: points N x P x 2 (x, y in pixels of the field), pen_down N x (P-1) whether
    each segment is drawn, widths N. A pixel's ink is 1 within half the pen's width of a drawn
    segment, falling to 0 over one pixel beyond it."""
    start, end = points[:, :-1].unsqueeze(2), points[:, 1:].unsqueeze(2)  # N x S x 1 x 2
    centres = torch.stack(torch.meshgrid(torch.arange(FIELD), torch.arange(FIELD), indexing="xy"), -1)
    pixels = centres.reshape(1, 1, -1, 2).float() + 0.5  # 1 x 1 x 784 x 2
    along, from_start = end - start, pixels - start
    length_squared = (along**2).sum(-1).clamp_min(1e-6)  # N x S x 1
    t = ((from_start * along).sum(-1) / length_squared).clamp(0, 1)  # N x S x 784
    squared = (from_start**2).sum(-1) - t * (2 * (from_start * along).sum(-1) - t * length_squared)
    squared = squared.masked_fill(~pen_down.unsqueeze(-1), float("inf"))
    ink = (widths.view(-1, 1) / 2 + 0.5 - squared.min(1).values.clamp_min(0).sqrt()).clamp(0, 1)
    return ink.view(-1, 1, FIELD, FIELD)


def fitted_to_box(points, widths, longer_side=20.0):
    """Points moved and scaled so that their ink (the points' extent and the pen's width) has its
    longer side `longer_side` pixels, centred in the field."""
    low, high = points.min(1, keepdim=True).values, points.max(1, keepdim=True).values
    extent = (high - low).max(-1, keepdim=True).values.clamp_min(1e-3)  # N x 1 x 1
    scale = (longer_side - widths.view(-1, 1, 1)).clamp_min(2) / extent
    return (points - (low + high) / 2) * scale + FIELD / 2


def centred(images):
    """Each image moved by whole pixels so that its centre of mass lies at the field's centre, as
    MNIST's digits were placed."""
    mass = images.sum((1, 2, 3)).clamp_min(1e-6)
    coordinates = torch.arange(FIELD, dtype=images.dtype) + 0.5
    row = (images.sum(3).squeeze(1) * coordinates).sum(1) / mass
    col = (images.sum(2).squeeze(1) * coordinates).sum(1) / mass
    shift = torch.stack([(FIELD / 2 - col).round(), (FIELD / 2 - row).round()], 1)
    return translated(images, shift)


def translated(images, shift):
    """Each image moved by its own (x, y) shift in pixels; what moves in is dark."""
    matrices = torch.zeros(len(images), 2, 3)
    matrices[:, 0, 0] = matrices[:, 1, 1] = 1
    matrices[:, :, 2] = -shift * 2 / FIELD
    grid = F.affine_grid(matrices, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def prepared(images, kind="digit"):
    """Pixel images placed as the preparation places ink: cropped to where the ink is above 0.2,
    the longer side scaled to 20 pixels (a digit, then its centre of mass centred) or 28 (an
    object, centred), in one resampling."""
    images = images / images.amax((1, 2, 3), keepdim=True).clamp_min(1e-6)
    height, width = images.shape[-2:]
    inked = images.squeeze(1) > 0.2
    top, bottom = ink_span(inked.any(2))
    left, right = ink_span(inked.any(1))
    longer = torch.maximum(bottom - top, right - left).clamp_min(1)
    field_pixel = longer / (20 if kind == "digit" else FIELD)  # in source pixels
    # affine_grid's units: each side of the source spans [-1, 1].
    matrices = torch.zeros(len(images), 2, 3)
    matrices[:, 0, 0], matrices[:, 1, 1] = field_pixel * FIELD / width, field_pixel * FIELD / height
    matrices[:, 0, 2], matrices[:, 1, 2] = (left + right) / width - 1, (top + bottom) / height - 1
    grid = F.affine_grid(matrices, [len(images), 1, FIELD, FIELD], align_corners=False)
    placed = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return centred(placed) if kind == "digit" else placed


def ink_span(inked):
    """(first, one past the last) index where each row of `inked` (N x L) is True."""
    index = torch.arange(inked.shape[1], dtype=torch.float32)
    first = torch.where(inked, index, math.inf).amin(1)
    return first, torch.where(inked, index, -math.inf).amax(1) + 1


def halved(images):
    """Images at half their size, each pixel the mean of four: shrunk so, thin strokes stay whole,
    where resampling straight to the field would skip over them."""
    return F.avg_pool2d(images, 2)


def pen_widths(count, generator):
    return uniform(count, *PEN_WIDTHS, generator)


def strokes(points, pen_down, generator):
    """Polylines drawn with random pen widths, fitted to the 20-pixel box and centred; a few hundred
    at a time, since every pixel's distance to every segment is measured at once."""
    widths = pen_widths(len(points), generator)
    fitted = fitted_to_box(points, widths)
    parts = zip(fitted.split(256), pen_down.split(256), widths.split(256))
    return centred(torch.cat([drawn(*part) for part in parts]))


def all_down(count, points):
    return torch.ones(count, points - 1, dtype=torch.bool)


def rotated(points, generator):
    angle = uniform((len(points), 1), 0, 2 * math.pi, generator)
    x, y = points[..., 0], points[..., 1]
    return torch.stack([x * angle.cos() - y * angle.sin(), x * angle.sin() + y * angle.cos()], -1)


# ----------------------------------------------------------------------------------------------
# The families
# ----------------------------------------------------------------------------------------------


def scribbles(count, generator, digits=None):
    """One smooth stroke that turns and turns: a random walk whose direction drifts."""
    steps = 28
    turns = torch.randn(count, steps, generator=generator) * uniform((count, 1), 0.7, 1.5, generator)
    heading = uniform((count, 1), 0, 2 * math.pi, generator) + turns.cumsum(1)
    moves = torch.stack([heading.cos(), heading.sin()], -1)
    points = torch.cat([torch.zeros(count, 1, 2), moves.cumsum(1)], 1)
    return strokes(points, all_down(count, steps + 1), generator)


def zigzags(count, generator, digits=None):
    """A zigzag of 4 to 8 sharp turns, at any angle (fewer would make a Z, which is a 2)."""
    corners = 10
    used = torch.randint(6, corners + 1, (count, 1), generator=generator)
    index = torch.arange(corners).expand(count, -1)
    x = index + uniform((count, corners), -0.3, 0.3, generator)
    y = torch.where(index % 2 == 0, 1.0, -1.0) * uniform((count, corners), 0.5, 2.0, generator)
    last = (used - 1).clamp(max=corners - 1)
    x, y = torch.where(index < used, x, x.gather(1, last)), torch.where(index < used, y, y.gather(1, last))
    points = rotated(torch.stack([x, y], -1), generator)
    return strokes(points, all_down(count, corners), generator)


def shapes(count, generator, digits=None):
    """The outline of a triangle, a square or a star, squashed and turned, half of them with two
    lines inside: a framed cross, a crossed-out box. (Polygons of more corners are left out: drawn
    by hand they are a 0.)"""
    corners = torch.randint(3, 5, (count, 1), generator=generator)
    star = torch.rand(count, 1, generator=generator) < 0.5
    points_of_star = torch.randint(5, 9, (count, 1), generator=generator)
    vertices = torch.where(star, points_of_star * 2, corners)
    points_count = 17
    index = torch.arange(points_count).expand(count, -1)
    angle = 2 * math.pi * index.clamp(max=vertices) / vertices
    inner = uniform((count, 1), 0.35, 0.55, generator)
    radius = torch.where(star & (index % 2 == 1), inner, 1.0)
    outline = torch.stack([radius * angle.cos(), radius * angle.sin()], -1)
    outline[..., 1] *= uniform((count, 1), 0.5, 1.0, generator)
    # A second part inside, drawn with the pen lifted on the way there: a cross through the middle.
    inside = uniform((count, 4, 2), -0.7, 0.7, generator)
    points = rotated(torch.cat([outline, inside], 1), generator)
    pen_down = torch.ones(count, points_count + 3, dtype=torch.bool)
    has_inside = torch.rand(count, generator=generator) < 0.5
    pen_down[:, points_count - 1] = False  # to the inside part
    pen_down[:, points_count + 1] = False  # between its two lines
    pen_down[:, points_count:] &= has_inside.unsqueeze(1)
    return strokes(points, pen_down, generator)


def symbols(count, generator, digits=None):
    """Two to four long straight strokes at clearly different angles: crosses, arrows, hashes,
    letters made of lines."""
    lines = 4
    centres = uniform((count, lines, 1, 2), -0.5, 0.5, generator)
    turns = uniform((count, lines), math.radians(35), math.radians(145), generator)
    angle = (uniform((count, 1), 0, math.pi, generator) + turns.cumsum(1)).unsqueeze(-1)
    half = uniform((count, lines, 1), 0.5, 1.0, generator)
    direction = torch.stack([angle.cos(), angle.sin()], -1) * half.unsqueeze(-1)  # N x lines x 1 x 2
    points = torch.cat([centres - direction, centres + direction], 2).reshape(count, lines * 2, 2)
    used = torch.randint(2, lines + 1, (count, 1), generator=generator)
    segment = torch.arange(lines * 2 - 1).expand(count, -1)
    pen_down = (segment % 2 == 0) & (segment // 2 < used)
    # Unused lines collapse onto the first point, so that they do not widen the box.
    unused = (torch.arange(lines * 2).expand(count, -1) // 2 >= used).unsqueeze(-1)
    points = torch.where(unused, points[:, :1], points)
    return strokes(points, pen_down, generator)


def blobs(count, generator, digits=None):
    """Filled shapes and specks: smooth random noise, cut at a random level."""
    noise = torch.rand(count, 1, 7, 7, generator=generator)
    smooth = F.interpolate(noise, size=FIELD, mode="bicubic", align_corners=False)
    level = uniform((count, 1, 1, 1), 0.55, 0.8, generator)
    return prepared(((smooth - level) * 8).clamp(0, 1))


def glyphs(count, generator, digits=None):
    """Letters and symbols that are no digit, in the fonts that matplotlib ships (DejaVu and STIX),
    of random sizes and weights. Letters that are digits when written by hand (O, I, l, S, Z, B, b,
    g, q, G, D) are left out."""
    from PIL import Image, ImageDraw

    fonts = glyph_fonts()
    choice = torch.randint(len(GLYPHS), (count,), generator=generator).tolist()
    font_choice = torch.randint(len(fonts), (count,), generator=generator).tolist()
    images = torch.zeros(count, 1, 56, 56)
    for index, (glyph, font) in enumerate(zip(choice, font_choice)):
        canvas = Image.new("L", (56, 56))
        draw = ImageDraw.Draw(canvas)
        left, top, right, bottom = draw.textbbox((0, 0), GLYPHS[glyph], font=fonts[font])
        draw.text(((56 - right - left) / 2, (56 - bottom - top) / 2), GLYPHS[glyph], fill=255, font=fonts[font])
        images[index, 0] = torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8).view(56, 56) / 255
    return prepared(halved(images))


GLYPHS = "ACEFHJKLMNPQRTUVWXYacdefhjkmnprtuvwxy#%&?!@$+=<>*~^{}[]/\\πλΣΩ∞αβδ€£¥→↑♥☺★"
_FONTS = []


def glyph_fonts():
    """matplotlib's own fonts, each at two sizes, loaded once."""
    if not _FONTS:
        import matplotlib
        from PIL import ImageFont

        folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
        names = ("DejaVuSans", "DejaVuSans-Bold", "DejaVuSerif", "DejaVuSansMono", "DejaVuSerif-Italic")
        _FONTS.extend(ImageFont.truetype(str(folder / f"{name}.ttf"), size) for name in names for size in (30, 40))
    return _FONTS


def mirrored_digits(count, generator, digits):
    """The dataset's digits mirrored left to right, or turned upside down: shapes a digit's strokes
    make that are no digit. Digits that stay digits so (0, 1 and 8; 2, 5, 6 and 9 upside down) are
    left out."""
    pixels, labels = digits
    mirror_ok = torch.isin(labels, torch.tensor([2, 3, 4, 5, 6, 7, 9]))
    turn_ok = torch.isin(labels, torch.tensor([3, 4, 7]))
    turn = torch.rand(count, generator=generator) < 0.3
    mirrored = pick(pixels[mirror_ok], count, generator).flip(3)
    turned = pick(pixels[turn_ok], count, generator).flip(2, 3)
    return prepared(torch.where(turn.view(-1, 1, 1, 1), turned, mirrored))


def two_digits(count, generator, digits):
    """Two of the dataset's digits side by side, taken together as one image."""
    first, second = pick(digits[0], count, generator), pick(digits[0], count, generator)
    return prepared(halved(torch.cat([first, second], 3)))


def overlaid(count, generator, digits):
    """Two of the dataset's digits drawn over each other, one turned."""
    first = pick(digits[0], count, generator)
    second = pick(digits[0], count, generator).rot90(1, (2, 3))
    return prepared(torch.maximum(first, second))


def pick(digits, count, generator):
    return digits[torch.randint(len(digits), (count,), generator=generator)]


def pictures(count, generator, digits=None):
    """Pictures of several strokes, as people doodle them: a face, a house, a heart, a tree, a cloud,
    an arrow, a flower, a fish, a cup, an umbrella, an envelope, a car; each point moved by its own hand's
    jitter, the whole squashed and turned a little."""
    choice = torch.randint(len(PICTURES), (count,), generator=generator)
    points, pen_down = polylines([PICTURES[name] for name in PICTURE_NAMES], choice)
    points = points + torch.randn(points.shape, generator=generator) * uniform((count, 1, 1), 0.01, 0.04, generator)
    points[..., 0] *= uniform((count, 1), 0.75, 1.25, generator)
    angle = uniform((count, 1), -0.4, 0.4, generator)
    x, y = points[..., 0], points[..., 1]
    points = torch.stack([x * angle.cos() - y * angle.sin(), x * angle.sin() + y * angle.cos()], -1)
    return strokes(points, pen_down, generator)


def ring(x, y, rx, ry, start=0.0, end=2 * math.pi, steps=16):
    """Points along an ellipse's arc, as a list of (x, y)."""
    return [(x + rx * math.cos(a), y + ry * math.sin(a)) for a in torch.linspace(start, end, steps).tolist()]


UP = None  # lifts the pen between two strokes
# fmt: off
PICTURES = {
    "face": [*ring(0, 0, 1, 1), UP, *ring(-0.35, -0.3, 0.08, 0.08, steps=6), UP, *ring(0.35, -0.3, 0.08, 0.08, steps=6),
             UP, *ring(0, 0.1, 0.5, 0.45, 0.5, math.pi - 0.5, 8)],
    "house": [(-1, 1), (-1, -0.1), (1, -0.1), (1, 1), (-1, 1), UP, (-1.2, 0), (0, -1), (1.2, 0), UP,
              (-0.2, 1), (-0.2, 0.4), (0.2, 0.4), (0.2, 1)],
    "heart": [(0, 1), *ring(-0.45, -0.3, 0.5, 0.5, 2.5, 2 * math.pi, 10),
              *ring(0.45, -0.3, 0.5, 0.5, math.pi, 2 * math.pi + 0.65, 10), (0, 1)],
    "tree": [(-0.15, 1), (-0.15, 0.6), (-0.8, 0.6), (-0.35, 0.1), (-0.65, 0.1), (-0.25, -0.4), (-0.45, -0.4), (0, -1),
             (0.45, -0.4), (0.25, -0.4), (0.65, 0.1), (0.35, 0.1), (0.8, 0.6), (0.15, 0.6), (0.15, 1)],
    "cloud": [*ring(-0.6, 0.1, 0.4, 0.35, 1.2, 4.6, 8), *ring(0, -0.25, 0.5, 0.45, 3.3, 6.0, 8),
              *ring(0.6, 0.1, 0.4, 0.35, 4.6, 8.0, 8), (-0.6, 0.45)],
    "arrow": [(-1, 0.5), (1, -0.5), UP, (0.35, -0.6), (1, -0.5), (0.75, 0.1)],
    "flower": [*ring(0, -0.4, 0.2, 0.2, steps=8), UP, *ring(0, -0.75, 0.15, 0.22, steps=8), UP,
               *ring(0.35, -0.4, 0.22, 0.15, steps=8), UP, *ring(-0.35, -0.4, 0.22, 0.15, steps=8), UP,
               (0, -0.2), (0, 1), UP, (0, 0.6), (0.4, 0.35)],
    "fish": [*ring(0, 0, 0.75, 0.4, 0.3, 2 * math.pi - 0.3, 14), (1, 0.35), (1, -0.35), (0.7, -0.12), UP,
             *ring(-0.4, -0.1, 0.05, 0.05, steps=5)],
    "cup": [(-0.6, -0.7), (-0.5, 0.8), (0.5, 0.8), (0.6, -0.7), UP, *ring(0.65, 0.05, 0.3, 0.3, -1.4, 1.4, 8)],
    "umbrella": [*ring(0, 0, 1, 0.7, math.pi, 2 * math.pi, 14), (-1, 0), UP, (0, 0), (0, 0.9),
                 *ring(-0.15, 0.9, 0.15, 0.15, 0, math.pi, 5)],
    "envelope": [(-1, -0.6), (1, -0.6), (1, 0.6), (-1, 0.6), (-1, -0.6), (0, 0.1), (1, -0.6)],
    "car": [(-1, 0.3), (-1, -0.1), (-0.5, -0.2), (-0.3, -0.6), (0.4, -0.6), (0.6, -0.2), (1, -0.1), (1, 0.3), (-1, 0.3),
            UP, *ring(-0.5, 0.35, 0.2, 0.2, steps=8), UP, *ring(0.5, 0.35, 0.2, 0.2, steps=8)],
}
# fmt: on
PICTURE_NAMES = list(PICTURES)


def polylines(drawings, choice):
    """(points N x P x 2, pen_down N x P-1) of the drawings chosen, each a list of points with UP
    between strokes; shorter ones padded by their last point, the pen lifted."""
    longest = max(len(drawing) for drawing in drawings)
    table = torch.zeros(len(drawings), longest, 2)
    down = torch.zeros(len(drawings), longest - 1, dtype=torch.bool)
    for index, drawing in enumerate(drawings):
        points = [point for point in drawing if point is not None]
        lifted = [i for i, point in enumerate(drawing) if point is None]
        table[index, : len(points)] = torch.tensor(points)
        table[index, len(points) :] = table[index, len(points) - 1]
        down[index, : len(points) - 1] = True
        for number, position in enumerate(lifted):
            down[index, position - number - 1] = False  # the segment that jumps over the lift
    return table[choice], down[choice]


def textures(count, generator, digits=None):
    """Hatching, a grid, dots, or clutter of short strokes: marks that fill the box without forming a shape."""
    marks = 24  # points: twelve strokes of two points each
    kind = torch.randint(4, (count, 1, 1), generator=generator)
    stroke = torch.arange(marks).view(1, marks, 1) // 2
    ends = torch.tensor([-1.0, 1.0]).repeat(marks // 2).view(1, marks, 1)
    # Hatching: five parallel lines across the box; a grid: four one way and four across them.
    hatch_offset = torch.linspace(-1, 1, 5)[stroke.clamp(max=4)]
    hatching = torch.cat([ends, hatch_offset], 2).expand(count, -1, -1)
    grid_offset = torch.linspace(-1, 1, 4)[(stroke % 4).clamp(max=3)]
    across = torch.cat([ends, grid_offset], 2)
    grid = torch.where(stroke < 4, across, across.flip(2)).where(stroke < 8, across[:, :1]).expand(count, -1, -1)
    # Dots and clutter: short marks anywhere in the box.
    centres = uniform((count, marks // 2, 1, 2), -1, 1, generator)
    heading = uniform((count, marks // 2, 1, 1), 0, 2 * math.pi, generator)
    direction = torch.cat([heading.cos(), heading.sin()], -1)
    dots = torch.cat([centres, centres + 0.02 * direction], 2).reshape(count, marks, 2)
    clutter = torch.cat([centres, centres + 0.4 * direction], 2).reshape(count, marks, 2)
    points = torch.where(kind == 0, hatching, torch.where(kind == 1, grid, torch.where(kind == 2, dots, clutter)))
    points = rotated(points, generator)
    pen_down = torch.arange(marks - 1).expand(count, -1) % 2 == 0
    return strokes(points, pen_down, generator)


def words(count, generator, digits=None):
    """Two to five letters side by side, in the fonts that matplotlib ships: a word, where one digit is awaited."""
    from PIL import Image, ImageDraw

    fonts = glyph_fonts()
    lengths = torch.randint(2, 6, (count,), generator=generator).tolist()
    letters = torch.randint(len(WORD_LETTERS), (count, 5), generator=generator).tolist()
    font_choice = torch.randint(len(fonts), (count,), generator=generator).tolist()
    images = torch.zeros(count, 1, 56, 224)
    for index, (length, chosen, font) in enumerate(zip(lengths, letters, font_choice)):
        canvas = Image.new("L", (224, 56))
        draw = ImageDraw.Draw(canvas)
        text = "".join(WORD_LETTERS[letter] for letter in chosen[:length])
        left, top, right, bottom = draw.textbbox((0, 0), text, font=fonts[font])
        draw.text(((224 - right - left) / 2, (56 - bottom - top) / 2), text, fill=255, font=fonts[font])
        images[index, 0] = torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8).view(56, 224) / 255
    return prepared(images)


WORD_LETTERS = "abcdefghijkmnopqrstuvwxyzACEFHKLMNPRTUVWXY"


# Families drawn with a pen or typed: they work for any dataset. Families made of the dataset's own
# images (digits: its pixels and labels) say what a digit is not: mirrored, two side by side, overlaid.
DRAWN = {
    "scribbles": scribbles,
    "zigzags": zigzags,
    "shapes": shapes,
    "symbols": symbols,
    "blobs": blobs,
    "glyphs": glyphs,
    "pictures": pictures,
    "textures": textures,
    "words": words,
}
FROM_DIGITS = {"mirrored_digits": mirrored_digits, "two_digits": two_digits, "overlaid": overlaid}
FAMILIES = DRAWN | FROM_DIGITS


def families_for(kind):
    """The families that are not of a dataset's kind: for digits all of them; for objects (clothes)
    only the drawn ones, since two clothes side by side are still clothes."""
    return FAMILIES if kind == "digit" else DRAWN


def make(names, count, generator, digits, kind="digit"):
    """`count` images of each family in `names`, in that order; objects' families placed as an object is."""
    images = []
    for name in names:
        made = FAMILIES[name](count, generator, digits)
        images.append(made if kind == "digit" else prepared(made, "object"))
    return torch.cat(images)
