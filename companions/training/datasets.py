"""The datasets that --dataset names: MNIST and two of its kind, each with its files' folder, its
classes, the mean and std that normalise it, and what --augment may do to its images."""

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Dataset:
    """A 28x28 grayscale dataset in MNIST's format (60,000 + 10,000 images, ten classes)."""

    name: str  # its --dataset value
    title: str
    folder: str  # the name of its torchvision class, which is also its folder: <data-dir>/<folder>/raw/
    classes: tuple  # as its torchvision class names them
    # Of all training pixels scaled to 0..1: data.float().div(255).mean() and .std() of torchvision's
    # training split (population std), rounded to 4 places.
    mean: float
    std: float
    image_kind: str  # "digit" (a photo is prepared as MNIST was made) or "object" (as Fashion-MNIST was)
    not_of_kind: str  # what an answer says of an image unlike the dataset's: "not a digit"
    augment_limits: dict  # what --augment may do to an image without changing its class
    # The 1st and 99th percentile of its training images' stroke widths, as companions/using/prepare.py
    # measures them; predict brings strokes outside that range to its nearer end. None: left as they are.
    stroke_widths: tuple = None

    def torchvision_class(self):
        """Its torchvision dataset class (file names, MD5 sums, mirrors), imported only when the files
        must be checked, extracted or fetched: importing torchvision takes longer than reading them."""
        return getattr(importlib.import_module("torchvision.datasets"), self.folder)


# fmt: off
# What --augment may do to a handwritten character: affine (rotation and shear up to 10 degrees, scale
# by up to 10 %, shift by up to 2 pixels, no mirror images); elastic (a displacement field of uniform
# noise blurred by a Gaussian of sigma pixels, times alpha pixels, as Simard et al. 2003 made theirs);
# thickness (each image moved toward its 3x3 grey-scale dilation or erosion by up to this share).
DIGIT_AUGMENT_LIMITS = {"degrees": 10, "scale": 0.1, "shear_degrees": 10, "shift_pixels": 2, "mirror": False,
                        "elastic_sigma_pixels": 4, "elastic_alpha_pixels": 10, "thickness": 0.5}
# Clothes are not drawn by hand: no elastic distortion, no change of thickness; mirror images are clothes too.
CLOTHES_AUGMENT_LIMITS = {**DIGIT_AUGMENT_LIMITS, "degrees": 5, "shear_degrees": 5, "mirror": True,
                          "elastic_alpha_pixels": 0, "thickness": 0}
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
KMNIST_CLASSES = ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")
DATASETS = {dataset.name: dataset for dataset in (
    Dataset("mnist", "MNIST", "MNIST", tuple("0123456789"), 0.1307, 0.3081, "digit", "not a digit",
            DIGIT_AUGMENT_LIMITS,
            stroke_widths=(1.07, 3.61)),
    Dataset("fashion-mnist", "Fashion-MNIST", "FashionMNIST", FASHION_CLASSES, 0.2860, 0.3530, "object",
            "not clothing", CLOTHES_AUGMENT_LIMITS),
    # KMNIST's statistics are the published ones (Clanuwat et al., 2018): its files cannot be fetched here.
    Dataset("kmnist", "Kuzushiji-MNIST", "KMNIST", KMNIST_CLASSES, 0.1918, 0.3483, "digit",
            "not a character", DIGIT_AUGMENT_LIMITS),
)}
# fmt: on
