"""--augment's kernels: each image of a batch moved, distorted and thickened by its own random
amounts, drawn for the whole global batch from one generator, so that any number of processes and
a resumed run change every image exactly as one process would."""

import hashlib
import math

import torch
import torch.nn.functional as F

from companions.training.devices import memory_format_for


def random_affine_matrices(count, generator, limits):
    """`count` random 2x3 matrices for F.affine_grid: rotation, shear, scale and shift, each way up to
    its limit, and a mirror image half of the time where the limits allow it."""

    def uniform(limit):
        return (torch.rand(count, generator=generator) * 2 - 1) * limit

    angle, shear = uniform(math.radians(limits["degrees"])), uniform(math.radians(limits["shear_degrees"]))
    scale = 1 + uniform(limits["scale"])
    shift = 2 / 28 * limits["shift_pixels"]  # affine_grid spans the 28 pixels with [-1, 1]
    cos, sin, tan = angle.cos(), angle.sin(), shear.tan()
    matrices = torch.stack(
        [
            torch.stack([cos / scale, (cos * tan - sin) / scale, uniform(shift)], 1),
            torch.stack([sin / scale, (sin * tan + cos) / scale, uniform(shift)], 1),
        ],
        1,
    )
    if limits["mirror"]:
        matrices[:, :, 0] *= torch.where(torch.rand(count, generator=generator) < 0.5, -1.0, 1.0).unsqueeze(1)
    return matrices


def random_displacements(count, generator, limits):
    """`count` smooth random displacement fields, count x 28 x 28 x 2 in F.affine_grid's units:
    uniform noise in [-1, 1] blurred by a Gaussian of sigma pixels, times alpha pixels."""
    sigma, alpha = limits["elastic_sigma_pixels"], limits["elastic_alpha_pixels"]
    noise = torch.rand(count, 2, 28, 28, generator=generator) * 2 - 1
    # The blur as two matrix products (a Gaussian is separable): rows, then columns, 3 sigma wide,
    # zero beyond the border; much faster than a convolution with one channel.
    offsets = torch.arange(28).view(-1, 1) - torch.arange(28)
    blur = torch.exp(-0.5 * (offsets / sigma) ** 2) * (offsets.abs() <= math.ceil(3 * sigma))
    blur /= blur[14].sum()  # the weights of one row, away from the border, sum to 1
    return (blur @ noise @ blur * alpha * 2 / 28).permute(0, 2, 3, 1)


def random_thickness(count, generator, limits):
    """`count` amounts in [-limit, limit]: above 0 toward a dilation, below 0 toward an erosion."""
    return (torch.rand(count, generator=generator) * 2 - 1) * limits["thickness"]


def resampled(images, matrices, displacements=None):
    """Each image moved by its own affine matrix, and distorted by its own displacement field if
    given, in one resampling on the images' device; the border value (MNIST's background) fills
    what moves in from outside."""
    grid = F.affine_grid(matrices.to(images.device), list(images.shape), align_corners=False)
    if displacements is not None:
        grid = grid + displacements.to(images.device)
    moved = F.grid_sample(images, grid, padding_mode="border", align_corners=False)
    return moved.contiguous(memory_format=memory_format_for(images.device))


def thickened(images, amounts):
    """Each image's strokes made wider or thinner by its own amount: the image moved that share of
    the way toward its 3x3 grey-scale dilation (amount > 0) or erosion (amount < 0)."""
    dilated = F.max_pool2d(images, 3, stride=1, padding=1)
    eroded = -F.max_pool2d(-images, 3, stride=1, padding=1)
    amounts = amounts.to(images.device).view(-1, 1, 1, 1)
    changed = images + amounts.abs() * (torch.where(amounts > 0, dilated, eroded) - images)
    return changed.contiguous(memory_format=memory_format_for(images.device))


def augment_batch(images, names, generator, count, share, limits):
    """The images of `share` (a slice of a global batch of `count`) with the augmentations `names`:
    every random number is drawn for the whole global batch, in the order affine, elastic, thickness. An
    augmentation whose limit is 0 would change nothing: it is neither drawn nor applied."""
    elastic = "elastic" in names and limits["elastic_alpha_pixels"] > 0
    thickness = "thickness" in names and limits["thickness"] > 0
    affine = "affine" in names
    matrices = random_affine_matrices(count, generator, limits) if affine else torch.eye(2, 3).expand(count, 2, 3)
    displacements = random_displacements(count, generator, limits) if elastic else None
    amounts = random_thickness(count, generator, limits) if thickness else None
    if affine or elastic:
        images = resampled(images, matrices[share], None if displacements is None else displacements[share])
    return images if amounts is None else thickened(images, amounts[share])


def augment_all(images, names, generator, limits):
    """Each image with the augmentations `names`, by its own random amounts; a thousand at a time,
    since the random fields for all at once would be slower."""
    return torch.cat(
        [augment_batch(part, names, generator, len(part), slice(None), limits) for part in images.split(1000)]
    )


def generator_for(*numbers):
    """A generator seeded by these numbers together (the CPU generator keeps 32 bits of a seed)."""
    digest = hashlib.sha256(",".join(map(str, numbers)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:4], "big"))
