"""How far a model's answers on a split can be trusted: how well its probabilities are calibrated
(the expected calibration error before and after its temperature, and the reliability diagram),
how accurate the answers it is sure of are against how many it gives (the accuracy-coverage curve),
and how many answers get each verdict. Training measures it on its evaluation split, evaluate on
the images it reads; metrics.json, report.html and calibration.png show it."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from loguru import logger

from companions.doubt.verdicts import VERDICTS, logits_of
from companions.reports.grids import new_figure, save_figure

BINS = 15  # of confidence, for the ECE and the reliability diagram


def expected_calibration_error(probabilities, labels):
    """ECE: over BINS equal bins of confidence, the share of answers in each times the gap between
    their mean confidence and their accuracy (Guo et al., 2017)."""
    confidence, accuracy, counts = reliability(probabilities, labels)
    shares = counts / counts.sum()
    return float((shares * (confidence - accuracy).abs()).nan_to_num().sum())


def reliability(probabilities, labels):
    """Per bin of confidence: (mean confidence, accuracy, count); NaN where a bin is empty."""
    confidence, predicted = probabilities.max(1)
    right = (predicted == labels).float()
    which = (confidence * BINS).ceil().clamp(1, BINS).long() - 1
    counts = torch.bincount(which, minlength=BINS).float()
    mean_confidence = torch.bincount(which, confidence, minlength=BINS) / counts
    accuracy = torch.bincount(which, right, minlength=BINS) / counts
    return mean_confidence, accuracy, counts


def coverage_curve(probabilities, labels):
    """(coverage, accuracy): answering only the k most confident of n, for every k, the share k/n
    answered and the accuracy of those answers."""
    confidence, predicted = probabilities.max(1)
    right = (predicted == labels)[confidence.argsort(descending=True, stable=True)].float()
    answered = torch.arange(1, len(right) + 1)
    return answered / len(right), right.cumsum(0) / answered


@dataclass
class Trust:
    split: str
    labels: torch.Tensor
    raw: torch.Tensor  # the probabilities as the network gives them (temperature 1)
    calibrated: torch.Tensor  # at the model's temperature
    verdicts: torch.Tensor  # an index into VERDICTS for every image
    doubt: object  # the companions.doubt.verdicts.Doubt that made them

    @property
    def right(self):
        return self.calibrated.argmax(1) == self.labels

    def counts(self):
        return {name: int((self.verdicts == index).sum()) for index, name in enumerate(VERDICTS)}

    def summary(self):
        """What metrics.json records: the doubt's numbers, the ECE before and after, how many answers
        got each verdict, and the shares of the right and of the wrong answers not called sure."""
        right, sure = self.right, self.verdicts == 0
        return {
            **self.doubt.summary(),
            "split": self.split,
            "ece_before": expected_calibration_error(self.raw, self.labels),
            "ece": expected_calibration_error(self.calibrated, self.labels),
            "verdicts": self.counts(),
            "coverage": sure.float().mean().item(),  # the share of answers it is sure of
            "accuracy_when_sure": right[sure].float().mean().item() if sure.any() else None,
            "right_flagged": (~sure & right).sum().item() / max(1, right.sum().item()),
            "wrong_flagged": (~sure & ~right).sum().item() / max(1, (~right).sum().item()),
        }

    def table_rows(self):
        """(what, value) rows for report.html."""
        numbers = self.summary()
        detector = (
            "none (--no-detector, or an older model file)"
            if numbers["not_a_digit_above"] is None
            else f"the dataset's, learned once; flags above {numbers['not_a_digit_above']:.3f}"
        )
        when_sure = numbers["accuracy_when_sure"]
        return [
            ("temperature", f"{numbers['temperature']:.3f}"),
            ("fitted on", numbers["calibrated_on"]),
            ("ECE before / after (15 bins)", f"{100 * numbers['ece_before']:.2f} % / {100 * numbers['ece']:.2f} %"),
            ("'not sure' below", f"{numbers['unsure_below']:.3f}"),
            ("'not a digit' detector", detector),
            *[(f"verdict {name.replace('_', ' ')}", count) for name, count in numbers["verdicts"].items()],
            ("answers it is sure of", f"{100 * numbers['coverage']:.2f} %"),
            ("accuracy of those", "" if when_sure is None else f"{100 * when_sure:.2f} %"),
            ("right answers flagged", f"{100 * numbers['right_flagged']:.2f} %"),
            ("wrong answers flagged", f"{100 * numbers['wrong_flagged']:.2f} %"),
        ]


def measure_trust(model, doubt, images, labels, split):
    """The model's Trust on a split (images normalised, on the model's device)."""
    logits = logits_of(model, images)
    calibrated, _, verdicts = doubt.verdicts(logits, images)
    labels = labels.cpu()
    return Trust(split, labels, F.softmax(logits, 1), calibrated.cpu(), verdicts.cpu(), doubt)


def log_trust(trust):
    """One line: the calibration, and what the answers on the split were called."""
    numbers = trust.summary()
    counts = ", ".join(f"{name.replace('_', ' ')} {count}" for name, count in numbers["verdicts"].items())
    logger.info(
        "Calibrated probabilities on the {} images: ECE {:.2f} % before, {:.2f} % after; answers {}; "
        "{:.2f} % of the right answers flagged, {:.1f} % of the wrong ones",
        trust.split,
        100 * numbers["ece_before"],
        100 * numbers["ece"],
        counts,
        100 * numbers["right_flagged"],
        100 * numbers["wrong_flagged"],
    )


def plot_calibration(trust, path):
    """Left, the reliability diagram: each bin's accuracy against its mean confidence, before and
    after the temperature, with the ECE, each point as large as its share of the answers; right,
    the accuracy of the answers it is surest of against the share of answers given, with where
    "not sure" and "not a digit" cut."""
    figure = new_figure(10, 4.2)
    diagram, curve = figure.subplots(1, 2)
    diagram.plot([0, 1], [0, 1], color="gray", linewidth=0.8, linestyle="--", label="perfectly calibrated")
    for probabilities, name, colour in ((trust.raw, "before", "tab:gray"), (trust.calibrated, "after", "tab:blue")):
        confidence, accuracy, counts = reliability(probabilities, trust.labels)
        shown = counts > 0
        ece = 100 * expected_calibration_error(probabilities, trust.labels)
        diagram.plot(
            confidence[shown], accuracy[shown], "-", color=colour, linewidth=1, label=f"{name}: ECE {ece:.2f} %"
        )
        # A bin's point grows with its answers: the few in the lowest bins weigh little in the ECE.
        sizes = 8 + 250 * (counts[shown] / counts.max()).sqrt()
        diagram.scatter(confidence[shown], accuracy[shown], s=sizes, color=colour, alpha=0.8, zorder=3)
    diagram.set(
        xlabel="confidence (mean of the bin)",
        ylabel="accuracy of the bin",
        xlim=(0, 1.02),
        ylim=(0, 1.02),
        title=f"Reliability on {len(trust.labels)} {trust.split} images (T = {trust.doubt.temperature:.2f}; "
        "a point's size: its answers)",
    )
    coverage, accuracy = coverage_curve(trust.calibrated, trust.labels)
    curve.plot(coverage, 100 * accuracy, color="tab:blue")
    sure = (trust.verdicts == 0).float().mean().item()
    curve.axvline(sure, color="tab:orange", linestyle="--", label=f"sure of {100 * sure:.1f} % of them")
    curve.set(
        xlabel="share of answers given (most confident first)",
        ylabel="accuracy of those (%)",
        title="Accuracy against coverage",
        xlim=(0, 1.01),
    )
    for axis in (diagram, curve):
        axis.legend(fontsize=8, loc="lower right")
        axis.grid(alpha=0.3)
        axis.title.set_fontsize(10)
    figure.tight_layout()
    save_figure(figure, path)
