"""What a trained model knows it does not know, learned once training ends and kept in the model file:

- a temperature that makes its probabilities mean what they say (Guo et al., 2017), fitted on
  training images it never saw in that form: each one moved, distorted and thickened as the `best`
  recipe's augmentation does (a model that reads those far worse than its training images is
  fitted on the plain training images instead, and never sharpened there). The test set is never read;
- "not sure": the probability below which an answer is called unsure, the lowest that flags at
  most UNSURE_AIM of the right answers on those same images;
- "not a digit": a small network of its own beside the classifier (which stays as it was), trained
  to tell the dataset's images from images of other kinds made on the spot (companions/non_digits.py),
  and the score above which it calls an image not of the dataset's kind: the lowest that flags at
  most DETECTOR_AIM of training images it did not learn from.

Each answer is then one of three verdicts: "sure", "not_sure" (its calibrated probability is below
the threshold) or "not_a_digit" (the class is still given, as a guess).
"""

import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from loguru import logger

from companions import non_digits
from companions.adam import Adam  # torch's fused Adam without torch.compile's hooks, as training's
from companions.augment import augment_batch, generator_for
from companions.errors import CliError

UNSURE_AIM = 0.02  # the share of right answers on the calibration images that "not sure" may flag
DETECTOR_AIM = 0.0075  # the share of held-out training images that "not a digit" may flag
CALIBRATION_IMAGES = 20_000  # training images, augmented, that the temperature and threshold are fitted on
AUGMENTATION = ("affine", "elastic", "thickness")
MAX_AUGMENTED_DROP = 0.1  # the accuracy a model may lose on augmented images for them to calibrate it
AUGMENTED = "augmented training images"
OLD_UNSURE_BELOW = 0.84  # what a model file without these uses: the one threshold of earlier versions
VERDICTS = ("sure", "not_sure", "not_a_digit")


# ----------------------------------------------------------------------------------------------
# Calibration: a temperature, and the "not sure" threshold
# ----------------------------------------------------------------------------------------------


@torch.inference_mode()
def logits_of(model, images, batch=1000):
    was_training = model.training
    model.eval()
    logits = torch.cat([model(chunk) for chunk in images.split(batch)])
    model.train(was_training)
    return logits.float().cpu()


def calibration_images(train_images, dataset, seed):
    """(plain images, the same augmented, indices into the training split): CALIBRATION_IMAGES
    training images, a seeded choice, and each of them augmented by its own random amounts."""
    generator = generator_for(seed, "calibration")
    chosen = torch.randperm(len(train_images), generator=generator)[:CALIBRATION_IMAGES]  # all, if fewer
    images = train_images[chosen.to(train_images.device)]
    return images, augmented(images, dataset, generator), chosen


def calibration_logits(model, plain, augmented_images, labels):
    """(logits, what they are of): the model's scores for the augmented training images, which it
    never saw in that form, where it reads them nearly as well as the plain ones; else (a model far
    from converged, which augmentation makes far harder for it than new images are) for the plain
    training images."""
    on_augmented, on_plain = logits_of(model, augmented_images), logits_of(model, plain)
    plain_accuracy = (on_plain.argmax(1) == labels).float().mean().item()
    augmented_accuracy = (on_augmented.argmax(1) == labels).float().mean().item()
    if plain_accuracy - augmented_accuracy <= MAX_AUGMENTED_DROP:
        return on_augmented, AUGMENTED
    return on_plain, "training images (augmented ones are far harder for this model)"


def augmented(images, dataset, generator):
    """Each image moved, distorted and thickened by its own random amounts; a thousand at a time,
    since the augmentation's random fields for all at once would be slower."""
    limits = dataset.augment_limits
    parts = images.split(1000)
    return torch.cat([augment_batch(part, AUGMENTATION, generator, len(part), slice(None), limits) for part in parts])


def fit_temperature(logits, labels):
    """The temperature T that minimises the cross-entropy of softmax(logits / T): scipy's bounded
    search over log T."""
    from scipy.optimize import minimize_scalar  # only training and finetune fit one: scipy loads slowly

    labels = labels.cpu()

    def loss(log_temperature):
        return F.cross_entropy(logits / math.exp(log_temperature), labels).item()

    return math.exp(minimize_scalar(loss, bounds=(-4, 4), method="bounded").x)


def unsure_threshold(probabilities, labels, aim=UNSURE_AIM):
    """The probability below which at most `aim` of the right answers fall."""
    confidence, predicted = probabilities.max(1)
    right = confidence[predicted == labels.cpu()].sort().values
    if not len(right):
        return 0.0
    return right[int(aim * len(right))].item()


# ----------------------------------------------------------------------------------------------
# "Not a digit": a detector beside the classifier
# ----------------------------------------------------------------------------------------------


class Detector(nn.Module):
    """A small convolutional network that reads an input as one of the dataset's ten classes or as
    an eleventh, "something else", and scores how unlike the dataset's images it is: the log-odds
    of "something else" against all ten classes together. Learning the ten classes makes it learn
    what each looks like, so that a shape near none of them scores high too. It takes the
    classifier's normalised input."""

    def __init__(self):
        super().__init__()
        # fmt: off
        self.layers = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.AvgPool2d(2),
            nn.Conv2d(6, 12, 5), nn.ReLU(), nn.AvgPool2d(2),
            nn.Flatten(), nn.Linear(300, 48), nn.ReLU(), nn.Linear(48, 11),
        )
        # fmt: on

    def forward(self, images):
        logits = self.layers(images)
        return logits[:, 10] - torch.logsumexp(logits[:, :10], 1)


DETECTOR_HELD_OUT = 5_000  # the training split's last images: the detector never learns from them
DETECTOR_STEPS = 400
DETECTOR_BATCH = 128  # of each kind: the dataset's images and images of other kinds
FAMILY_IMAGES = 1_000  # made of each family, each then moved and distorted once


def detector_images(train_pixels, train_labels, dataset, generator, families=None, per_family=FAMILY_IMAGES):
    """The images of other kinds that a detector learns from: `per_family` of each family."""
    names = families or list(non_digits.families_for(dataset.image_kind))
    return non_digits.make(names, per_family, generator, (train_pixels, train_labels), dataset.image_kind)


def train_detector(train_images, train_labels, dataset, seed, families=None, steps=None):
    """(the detector, the scores of the held-out training images): trained for `steps` steps (by
    default DETECTOR_STEPS, or about one pass over a smaller training split) of
    Adam on batches of the dataset's images (half of them augmented anew) with their classes, and
    as many made images of other kinds (augmented once) as class 10, on the training images' device."""
    device = train_images.device
    generator = generator_for(seed, "detector")
    # A small training split (a quick run) gets a detector in proportion: about one pass over it.
    held_out_count = min(DETECTOR_HELD_OUT, len(train_images) // 10)
    learn, held_out = train_images[:-held_out_count], train_images[-held_out_count:]
    learn_labels = train_labels[:-held_out_count]
    steps = steps or min(DETECTOR_STEPS, max(10, len(learn) // DETECTOR_BATCH))
    per_family = min(FAMILY_IMAGES, max(16, len(learn) // 50))
    pixels = learn[:10_000].cpu() * dataset.std + dataset.mean
    others = detector_images(pixels, learn_labels[:10_000].cpu(), dataset, generator, families, per_family)
    others = augmented(others.sub(dataset.mean).div(dataset.std).to(device), dataset, generator)
    with torch.random.fork_rng(devices=[]):  # the detector's first weights, without moving torch's own seed
        torch.manual_seed(seed)
        detector = Detector().to(device)
    optimizer = Adam(detector.parameters(), lr=2e-3, betas=(0.9, 0.999))
    other_class = torch.full((DETECTOR_BATCH,), 10, device=device)
    half = DETECTOR_BATCH // 2
    for _ in range(steps):
        chosen = torch.randint(len(learn), (DETECTOR_BATCH,), generator=generator).to(device)
        mine = learn[chosen]
        mine[:half] = augment_batch(mine[:half], AUGMENTATION, generator, half, slice(None), dataset.augment_limits)
        theirs = others[torch.randint(len(others), (DETECTOR_BATCH,), generator=generator).to(device)]
        logits = detector.layers(torch.cat([mine, theirs]))
        loss = F.cross_entropy(logits, torch.cat([learn_labels[chosen], other_class]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    detector.eval()
    return detector, logits_of(detector, held_out)


def detector_threshold(held_out_scores, aim=DETECTOR_AIM):
    """The score above which at most `aim` of the held-out training images lie."""
    ranked = held_out_scores.sort(descending=True).values
    return ranked[int(aim * len(ranked))].item()


# ----------------------------------------------------------------------------------------------
# Learned once training ends; kept in the model file
# ----------------------------------------------------------------------------------------------


@dataclass
class Doubt:
    """What a model file keeps of it. A file without it (an older one) gets temperature 1, the old
    threshold and no detector."""

    temperature: float = 1.0
    unsure_below: float = OLD_UNSURE_BELOW
    detector: nn.Module = None
    not_a_digit_above: float = math.inf
    calibrated_on: str = "nothing (an older model file)"

    def as_saved(self):
        """What goes into the model file: plain numbers, and the detector's weights."""
        saved = {
            "temperature": self.temperature,
            "unsure_below": self.unsure_below,
            "calibrated_on": self.calibrated_on,
        }
        if self.detector is not None:
            saved |= {"detector": self.detector.state_dict(), "not_a_digit_above": self.not_a_digit_above}
        return saved

    def summary(self):
        """Its numbers, for metrics.json and the log."""
        return {
            "temperature": self.temperature,
            "calibrated_on": self.calibrated_on,
            "unsure_below": self.unsure_below,
            "not_a_digit_above": self.not_a_digit_above if self.detector is not None else None,
            "unsure_aim": UNSURE_AIM,
            "detector_aim": DETECTOR_AIM,
        }

    @torch.inference_mode()
    def verdicts(self, logits, images):
        """(calibrated probabilities N x 10, not-a-digit scores N (None without a detector), verdicts N)."""
        probabilities = F.softmax(logits.float() / self.temperature, 1)
        verdict = torch.where(probabilities.max(1).values < self.unsure_below, 1, 0)
        scores = None
        if self.detector is not None:
            scores = self.detector(images).float().to(logits.device)
            verdict = torch.where(scores > self.not_a_digit_above, 2, verdict)
        return probabilities, scores, verdict


def learn_doubt(model, train_images, train_labels, dataset, seed, with_detector=True, kept=None):
    """A Doubt for a trained model: its temperature and "not sure" threshold fitted on training images
    (augmented, where the model reads those nearly as well as the plain ones); a detector trained
    anew, or none, or the one (with its threshold) that the Doubt `kept` holds."""
    started = time.perf_counter()
    plain, augmented_images, chosen = calibration_images(train_images, dataset, seed)
    labels = train_labels[chosen.to(train_labels.device)].cpu()
    logits, calibrated_on = calibration_logits(model, plain, augmented_images, labels)
    temperature = fit_temperature(logits, labels)
    if calibrated_on != AUGMENTED and temperature < 1:
        # Fitted on the very images it learned, a temperature below 1 would make the model surer than
        # they show it to be on anything new: such a fit is not trusted, and the scores stay as they are.
        temperature, calibrated_on = 1.0, f"{calibrated_on}; a fit below 1 there is not trusted"
    unsure_below = unsure_threshold(F.softmax(logits / temperature, 1), labels)
    learned = Doubt(temperature, unsure_below, calibrated_on=calibrated_on)
    if kept is not None:
        learned.detector, learned.not_a_digit_above = kept.detector, kept.not_a_digit_above
    elif with_detector:
        detector, held_out_scores = train_detector(train_images, train_labels, dataset, seed)
        learned.detector, learned.not_a_digit_above = detector, detector_threshold(held_out_scores)
    logger.info(
        "Calibrated on {} {}: temperature {:.3f}, 'not sure' below {:.3f}; {} ({:.1f} s)",
        len(labels),
        calibrated_on,
        temperature,
        unsure_below,
        "no 'not a digit' detector"
        if learned.detector is None
        else "the 'not a digit' detector kept"
        if kept is not None
        else "a 'not a digit' detector trained",
        time.perf_counter() - started,
    )
    return learned


def saved_doubt(payload, device, path):
    """The Doubt a model file holds, or None where it holds none (an older file); one that does not
    fit (a damaged or foreign file) is refused in one line."""
    saved = payload.get("doubt")
    if not isinstance(saved, dict):
        return None
    try:
        detector = None
        if isinstance(saved.get("detector"), dict):
            detector = Detector()
            detector.load_state_dict(saved["detector"])
            detector = detector.to(device).eval()
        learned = Doubt(
            float(saved.get("temperature", 1.0)),
            float(saved.get("unsure_below", OLD_UNSURE_BELOW)),
            detector,
            float(saved.get("not_a_digit_above", math.inf)),
            str(saved.get("calibrated_on", "")),
        )
    except (RuntimeError, TypeError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CliError(f"{path}: its calibration or 'not a digit' detector cannot be read ({reason}).") from None
    if not learned.temperature > 0:
        raise CliError(f"{path}: its temperature, {learned.temperature}, is not a positive number.")
    return learned
