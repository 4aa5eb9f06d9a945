"""What a trained model knows it does not know, learned once training ends and kept in the model file:

- a temperature that makes its probabilities mean what they say (Guo et al., 2017), fitted on
  training images it never saw in that form: each one moved, distorted and thickened as the `best`
  recipe's augmentation does (a model that reads those far worse than its training images is
  fitted on the plain training images instead, and never sharpened there). The test set is never read;
- "not sure": the probability below which an answer is called unsure, the lowest that flags at
  most UNSURE_AIM of the right answers on those same images;
- "not a digit": the dataset's detector (companions/doubt/detector.py, learned once per dataset and kept
  beside its files: companions/doubt/kept_detector.py), a copy of which goes into the model file, and the
  score above which it calls an image not of the dataset's kind.

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

from companions.doubt.detector import AUGMENTATION, Detector, scores_of
from companions.doubt.detector import RECIPE as DETECTOR_RECIPE
from companions.training.augment import augment_all, generator_for
from companions.training.errors import CliError
from companions.training.files import first_line

UNSURE_AIM = 0.02  # the share of right answers on the calibration images that "not sure" may flag
CALIBRATION_IMAGES = 20_000  # training images, augmented, that the temperature and threshold are fitted on
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
    return images, augment_all(images, AUGMENTATION, generator, dataset.augment_limits), chosen


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
            "detector_aim": DETECTOR_RECIPE["aim"],
        }

    @torch.inference_mode()
    def verdicts(self, logits, images):
        """(calibrated probabilities N x 10, not-a-digit scores N (None without a detector), verdicts N)."""
        probabilities = F.softmax(logits.float() / self.temperature, 1)
        verdict = torch.where(probabilities.max(1).values < self.unsure_below, 1, 0)
        scores = None
        if self.detector is not None:
            scores = scores_of(self.detector, images).to(logits.device)
            verdict = torch.where(scores > self.not_a_digit_above, 2, verdict)
        return probabilities, scores, verdict


def learn_doubt(model, train_images, train_labels, dataset, seed, detector=None, not_a_digit_above=math.inf):
    """A Doubt for a trained model: its temperature and "not sure" threshold fitted on training images
    (augmented, where the model reads those nearly as well as the plain ones), beside the dataset's
    detector and its threshold (or none)."""
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
    learned = Doubt(temperature, unsure_below, detector, not_a_digit_above, calibrated_on)
    logger.info(
        "Calibrated on {} {}: temperature {:.3f}, 'not sure' below {:.3f}; {} ({:.1f} s)",
        len(labels),
        calibrated_on,
        temperature,
        unsure_below,
        "no 'not a digit' detector" if detector is None else "with the dataset's 'not a digit' detector",
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
            detector = Detector.from_state(saved["detector"]).to(device).eval()
        learned = Doubt(
            float(saved.get("temperature", 1.0)),
            float(saved.get("unsure_below", OLD_UNSURE_BELOW)),
            detector,
            float(saved.get("not_a_digit_above", math.inf)),
            str(saved.get("calibrated_on", "")),
        )
    except (RuntimeError, TypeError, ValueError, KeyError, IndexError, AttributeError) as error:
        reason = first_line(error)
        raise CliError(f"{path}: its calibration or 'not a digit' detector cannot be read ({reason}).") from None
    if not learned.temperature > 0:
        raise CliError(f"{path}: its temperature, {learned.temperature}, is not a positive number.")
    return learned
