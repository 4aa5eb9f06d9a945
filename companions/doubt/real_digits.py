"""The dataset's own images made to look as digits really arrive at predict: drawn with a thick or a
thin pen, slanted, with broken strokes, blurred, scanned at a low resolution and enlarged, or
scanned in black and white. The "not a digit" detector learns these as digits, so that it doubts
shapes, not the way a real page changes a digit.

Each change is drawn for each image on its own, from the generator given, at twice the field's
resolution; the result is placed in the field as predict places ink (companions/doubt/non_digits.py's
`prepared`: the longer side 20 pixels, the centre of mass centred).
"""

import torch
import torch.nn.functional as F

from companions.doubt.non_digits import prepared, uniform

LOW_RESOLUTIONS = (10, 14, 20)  # pixels across, before a scan is enlarged back


def as_they_arrive(pixels, generator):
    """Digits (N x 1 x 28 x 28, 0..1, light on dark) changed as paper, pens and scanners change them."""
    count = len(pixels)
    if not count:
        return pixels

    def chosen(share):
        return (torch.rand(count, generator=generator) < share).view(-1, 1, 1, 1)

    images = F.interpolate(pixels, scale_factor=2, mode="bilinear", align_corners=False)
    images = slanted(images, uniform(count, -0.45, 0.45, generator), chosen(0.5))
    images = with_pen(images, torch.randint(-1, 3, (count,), generator=generator))
    images = torch.where(chosen(0.25), broken(images, generator), images)
    images = torch.where(chosen(0.3), low_resolution(images, generator), images)
    images = blurred(images, torch.randint(0, 4, (count,), generator=generator) * chosen(0.4).view(-1).long())
    images = torch.where(chosen(0.2), (images > 0.4).float(), images)
    return prepared(images.clamp(0, 1))


def slanted(images, shear, where):
    """Each image sheared sideways by its own amount, where `where` says."""
    matrices = torch.zeros(len(images), 2, 3)
    matrices[:, 0, 0] = matrices[:, 1, 1] = 1
    matrices[:, 0, 1] = shear
    grid = F.affine_grid(matrices, list(images.shape), align_corners=False)
    return torch.where(where, F.grid_sample(images, grid, align_corners=False), images)


def with_pen(images, steps):
    """Strokes made wider (steps > 0: that many 3x3 dilations) or thinner (one erosion at -1)."""
    changed = images
    for step in range(1, int(steps.max()) + 1):
        dilated = F.max_pool2d(changed, 3, stride=1, padding=1)
        changed = torch.where((steps >= step).view(-1, 1, 1, 1), dilated, changed)
    eroded = -F.max_pool2d(-images, 3, stride=1, padding=1)
    return torch.where((steps < 0).view(-1, 1, 1, 1), eroded, changed)


def broken(images, generator):
    """Gaps in the strokes: a few small patches of the image wiped out, as a dry pen or a fold leaves them."""
    size = images.shape[-1]
    noise = torch.rand(len(images), 1, 14, 14, generator=generator)
    smooth = F.interpolate(noise, size=size, mode="bicubic", align_corners=False)
    return images * (smooth < 0.85)


def low_resolution(images, generator):
    """Each image scanned at one of LOW_RESOLUTIONS pixels across, then enlarged without smoothing."""
    size = images.shape[-1]
    which = torch.randint(len(LOW_RESOLUTIONS), (len(images),), generator=generator)
    result = images.clone()
    for index, pixels in enumerate(LOW_RESOLUTIONS):
        mine = which == index
        small = F.interpolate(images[mine], size=pixels, mode="area")
        result[mine] = F.interpolate(small, size=size, mode="nearest")
    return result


def blurred(images, passes):
    """Each image blurred by its own number of 3x3 box filters (about a Gaussian, for two and more)."""
    result = images
    for step in range(1, int(passes.max()) + 1):
        smoothed = F.avg_pool2d(result, 3, stride=1, padding=1, count_include_pad=False)
        result = torch.where((passes >= step).view(-1, 1, 1, 1), smoothed, result)
    return result
