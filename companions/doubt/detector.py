"""The "not a digit" detector: a small network of its own beside the classifier, trained to tell the
dataset's images, as they really arrive, from images of other kinds, and the score above which it
calls an image not of the dataset's kind.

It depends only on the dataset, so it is learned once per dataset and kept beside its files
(companions/doubt/kept_detector.py); every model trained on that dataset then carries a copy in its file.
It learns from:
- the dataset's training images, but its last 10,000 (the `--validation 10000` split), with their
  classes: half moved, distorted and thickened anew in every batch as the `best` recipe's
  augmentation does, a quarter changed as paper, pens and scanners change a digit
  (companions/doubt/real_digits.py);
- as many images of other kinds, made on the spot (companions/doubt/non_digits.py), as an eleventh class.
Its threshold is the lowest score that flags at most RECIPE's aim of the held-out images, which it never saw.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from companions.doubt import non_digits
from companions.doubt.real_digits import as_they_arrive
from companions.training.adam import Adam  # torch's fused Adam without torch.compile's hooks, as training's
from companions.training.augment import augment_all, augment_batch, generator_for

# How the detector is made, declared once: the kept file is keyed by these, so that changing any of
# them learns a new one. Chosen on the validation split (see benchmarks/README.md).
# fmt: off
RECIPE = {
    "widths": (12, 24, 96),  # conv1's and conv2's maps, fc1's units
    "steps": 3000,           # of Adam, the rate falling along a cosine to zero
    "lr": 2e-3,
    "batch": 128,            # of each kind: the dataset's images and images of other kinds
    "per_family": 3000,      # images made of each family, each then moved and distorted once
    "real_looking": 20_000,  # the dataset's images changed once as paper, pens and scanners change them
    "held_out": 10_000,      # the training split's last images: never learned from; they set the threshold
    "aim": 0.0075,           # the share of them that "not a digit" may flag
    "seed": 0,
    "version": 2,            # raised whenever the families or the training loop change
}
# fmt: on
FULL_SPLIT = 50_000  # the images a detector learns from in a dataset of MNIST's size
AUGMENTATION = ("affine", "elastic", "thickness")  # as the `best` recipe's, and calibration's


class Detector(nn.Module):
    """A small convolutional network that reads an input as one of the dataset's ten classes or as
    an eleventh, "something else", and scores how unlike the dataset's images it is: the log-odds
    of "something else" against all ten classes together. Learning the ten classes makes it learn
    what each looks like, so that a shape near none of them scores high too. It takes the
    classifier's normalised input."""

    def __init__(self, widths=RECIPE["widths"]):
        super().__init__()
        c1, c2, f1 = widths
        # fmt: off
        self.layers = nn.Sequential(
            nn.Conv2d(1, c1, 5, padding=2), nn.ReLU(), nn.AvgPool2d(2),
            nn.Conv2d(c1, c2, 5), nn.ReLU(), nn.AvgPool2d(2),
            nn.Flatten(), nn.Linear(c2 * 25, f1), nn.ReLU(), nn.Linear(f1, 11),
        )
        # fmt: on

    def forward(self, images):
        logits = self.layers(images)
        return logits[:, 10] - torch.logsumexp(logits[:, :10], 1)

    @classmethod
    def from_state(cls, state):
        """The detector whose weights `state` holds, of whatever widths they were learned at."""
        widths = (
            state["layers.0.weight"].shape[0],
            state["layers.3.weight"].shape[0],
            state["layers.7.weight"].shape[0],
        )
        detector = cls(widths)
        detector.load_state_dict(state)
        return detector


@torch.inference_mode()
def scores_of(detector, images, batch=500):
    """The detector's scores, on the CPU; a few hundred images at a time, which keeps its maps in the cache."""
    return torch.cat([detector(chunk) for chunk in images.split(batch)]).float().cpu()


def held_out_count(image_count):
    """How many of the training split's last images the detector never learns from: RECIPE's, or a
    tenth of a small split."""
    return min(RECIPE["held_out"], image_count // 10)


def other_kinds(pixels, labels, dataset, generator, families, per_family):
    """Images of other kinds, `per_family` of each family, moved and distorted once, normalised."""
    names = families or list(non_digits.families_for(dataset.image_kind))
    made = non_digits.make(names, per_family, generator, (pixels, labels), dataset.image_kind)
    return augment_all(made.sub(dataset.mean).div(dataset.std), AUGMENTATION, generator, dataset.augment_limits)


def real_looking(pixels, labels, dataset, generator, count):
    """(images, labels): `count` of the images (pixels 0..1) changed once as real pages change digits,
    normalised; none for a dataset of objects (clothes are not drawn by hand)."""
    if dataset.image_kind != "digit":
        return pixels[:0].sub(dataset.mean).div(dataset.std), labels[:0]
    chosen = torch.randint(len(pixels), (count,), generator=generator)
    return as_they_arrive(pixels[chosen], generator).sub(dataset.mean).div(dataset.std), labels[chosen]


def train_detector(images, labels, dataset, families=None, steps=None):
    """(the detector, the scores of the held-out images) for a dataset's whole training split
    (`images` normalised, on the device to train on)."""
    device = images.device
    generator = generator_for(RECIPE["seed"], "detector")
    held_out = held_out_count(len(images))
    learn, learn_labels = images[:-held_out], labels[:-held_out]
    if len(learn) < FULL_SPLIT:  # a quick test's small split: about one pass over it, and few made images
        default_steps, per_family = max(10, len(learn) // RECIPE["batch"]), max(16, len(learn) // 50)
    else:
        default_steps, per_family = RECIPE["steps"], RECIPE["per_family"]
    steps = steps or default_steps
    pixels = learn.cpu() * dataset.std + dataset.mean
    others = other_kinds(pixels, learn_labels.cpu(), dataset, generator, families, per_family).to(device)
    real, real_labels = real_looking(
        pixels, learn_labels.cpu(), dataset, generator, min(RECIPE["real_looking"], len(learn))
    )
    real, real_labels = real.to(device), real_labels.to(device)
    with torch.random.fork_rng(devices=[]):  # the detector's first weights, without moving torch's own seed
        torch.manual_seed(RECIPE["seed"])
        detector = Detector(RECIPE["widths"]).to(device)
    optimizer = Adam(detector.parameters(), lr=RECIPE["lr"], betas=(0.9, 0.999))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    batch = RECIPE["batch"]
    other_class = torch.full((batch,), 10, device=device)
    for _ in tqdm(range(steps), desc="'not a digit' detector", unit="step", leave=False, disable=None):
        digits, digit_labels = digit_batch(learn, learn_labels, real, real_labels, batch, dataset, generator)
        theirs = others[torch.randint(len(others), (batch,), generator=generator).to(device)]
        loss = F.cross_entropy(detector.layers(torch.cat([digits, theirs])), torch.cat([digit_labels, other_class]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    detector.eval()
    return detector, scores_of(detector, images[-held_out:])


def digit_batch(learn, learn_labels, real, real_labels, batch, dataset, generator):
    """A batch of the dataset's images with their classes: half augmented anew, and a quarter of the
    real-looking ones where there are any."""
    device = learn.device
    chosen = torch.randint(len(learn), (batch,), generator=generator).to(device)
    digits, labels = learn[chosen], learn_labels[chosen]
    half = batch // 2
    digits[:half] = augment_batch(digits[:half], AUGMENTATION, generator, half, slice(None), dataset.augment_limits)
    if len(real):
        quarter = torch.randint(len(real), (batch // 4,), generator=generator).to(device)
        digits[-len(quarter) :], labels[-len(quarter) :] = real[quarter], real_labels[quarter]
    return digits, labels


def threshold_for(held_out_scores, aim=RECIPE["aim"]):
    """The score above which at most `aim` of the held-out training images lie."""
    ranked = held_out_scores.sort(descending=True).values
    return ranked[int(aim * len(ranked))].item()
