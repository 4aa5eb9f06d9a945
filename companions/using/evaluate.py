"""evaluate: a trained model's accuracy on its dataset's test set, or on a folder of your own
labelled images, with the evaluation's figures, report and metrics.json in a folder of its own.

    python mnist_recognition.py evaluate                          # -> outputs/evaluation/
    python mnist_recognition.py evaluate --images my_digits/      # -> outputs/evaluation-my_digits/
    python mnist_recognition.py evaluate --images my_numbers/     # with a labels.json: whole numbers
    python mnist_recognition.py evaluate --checkpoint a.pt b.pt c.pt   # each, and their ensemble

The default folder lies beside the checkpoint, so that a training run's own report, figures and
metrics are never replaced.
"""

import difflib
import json
import time
from pathlib import Path

import torch
from loguru import logger

import mnist_recognition as trainer
from companions.doubt.trust import Trust, log_trust, measure_trust
from companions.doubt.verdicts import Doubt, logits_of
from companions.reports import report
from companions.training import dataset_files, files
from companions.training.devices import Runtime, pick_device
from companions.training.errors import CliError
from companions.training.files import METRICS_FILE, REPORT_FILE, first_line
from companions.using import own_images
from companions.using.predict import read_number
from companions.using.prepare import ImageError, open_grayscale
from companions.using.trained import doubt_of, trained_model

WRITES = (METRICS_FILE, REPORT_FILE, *files.EVALUATION_FIGURES)
LABELS_FILE = "labels.json"  # in a folder of numbers: each image's file name and its number


def command(args):
    """Every input is checked (the model, the images or the dataset's files) before the folder is made."""
    checkpoints, args.checkpoint = args.checkpoint, args.checkpoint[0]
    if len(checkpoints) > 1:
        return evaluate_ensemble(args, checkpoints)
    runtime = Runtime(pick_device(args.device))
    model, payload, dataset = trained_model(args, runtime.device)
    learned = doubt_of(payload, args.checkpoint, runtime.device)
    if args.images is not None and (args.images / LABELS_FILE).is_file():
        return evaluate_numbers(args, runtime, model, learned, dataset)
    if args.images is not None:
        return evaluate_images(args, runtime, model, learned, dataset)
    if payload.get("eval_split") == "test":
        logger.info("{} recorded {:.3f} % at the end of training", args.checkpoint, payload["eval_accuracy"])
    dataset_files.prepare_files(args.data_dir, dataset, allow_download=not args.no_download)
    test_set = trainer.normalised_split(args.data_dir, dataset, False, args.test_limit, runtime.device)
    out_dir = prepare_out_dir(args)
    evaluation = trainer.evaluate(model, test_set, "test", runtime)
    trainer.log_accuracy(evaluation, dataset)
    trust = measure_trust(model, learned, *test_set, "test")
    metrics = evaluation_metrics(args, evaluation, dataset, trust)
    settings = {"checkpoint": args.checkpoint, **payload.get("config", {})}
    title = f"LeNet-5 on {dataset.title}, {args.checkpoint.name}: {evaluation.accuracy:.2f} % test accuracy"
    headline = f"{evaluation.accuracy:.3f} % of {len(evaluation.labels)} test images right"
    write_results(out_dir, runtime, test_set, evaluation, trust, dataset, args.seed, metrics, settings, title, headline)
    return 0


def prepare_out_dir(args, name="evaluation"):
    """--out-dir, or by default evaluation/ beside the checkpoint (evaluation-FOLDER/ for --images FOLDER)."""
    name = name if args.images is None else f"{name}-{args.images.resolve().name}"
    return files.prepare_out_dir(args.out_dir or args.checkpoint.parent / name, "evaluate", WRITES)


# ----------------------------------------------------------------------------------------------
# Several models: each one's accuracy, and their ensemble's
# ----------------------------------------------------------------------------------------------


def evaluate_ensemble(args, checkpoints):
    """Each model's accuracy, then the ensemble's (the mean of their probabilities), whose figures,
    report and metrics.json go into evaluation-ensemble/ beside the first checkpoint."""
    runtime = Runtime(pick_device(args.device))
    models, doubts, datasets = [], [], set()
    for checkpoint in checkpoints:
        args.checkpoint = checkpoint
        model, payload, dataset = trained_model(args, runtime.device)
        models.append(model)
        doubts.append(doubt_of(payload, checkpoint, runtime.device))
        datasets.add(dataset.name)
    args.checkpoint = checkpoints[0]
    if len(datasets) > 1:
        raise CliError(
            f"--checkpoint: the models were trained on {', '.join(sorted(datasets))}; an ensemble needs one dataset."
        )
    if args.images is not None:
        found = read_labelled(args.images, dataset)
        eval_set, split, described = (
            (found.inputs.to(runtime.device), found.labels.to(runtime.device)),
            "labelled",
            f"images in {args.images}",
        )
    else:
        dataset_files.prepare_files(args.data_dir, dataset, allow_download=not args.no_download)
        eval_set = trainer.normalised_split(args.data_dir, dataset, False, args.test_limit, runtime.device)
        split, described = "test", "test images"
    out_dir = prepare_out_dir(args, "evaluation-ensemble")
    each = []
    for checkpoint, model in zip(checkpoints, models):
        evaluation = trainer.evaluate(model, eval_set, split, runtime)
        logger.info("{}: {:.3f} %", checkpoint, evaluation.accuracy)
        each.append({"checkpoint": str(checkpoint), "eval_accuracy": evaluation.accuracy})
    ensemble = ensemble_evaluation(models, eval_set, split)
    trainer.log_accuracy(ensemble, dataset, f"{described}, the ensemble of {len(models)} models")
    trust = ensemble_trust(models, doubts, *eval_set, split)
    metrics = evaluation_metrics(args, ensemble, dataset, trust, checkpoints=[str(c) for c in checkpoints], models=each)
    settings = {"checkpoints": " ".join(map(str, checkpoints)), "images": args.images or "the test set"}
    title = f"An ensemble of {len(models)} LeNet-5 on {dataset.title}: {ensemble.accuracy:.2f} % accuracy"
    headline = (
        f"{ensemble.accuracy:.3f} % of {len(ensemble.labels)} {described} right (the models alone: "
        + ", ".join(f"{entry['eval_accuracy']:.2f} %" for entry in each)
        + ")"
    )
    write_results(out_dir, runtime, eval_set, ensemble, trust, dataset, args.seed, metrics, settings, title, headline)
    return 0


@torch.inference_mode()
def probabilities_of(model, images):
    """The model's probabilities for every image, in evaluation's batches."""
    return torch.cat([torch.softmax(model(chunk), 1) for chunk in images.split(trainer.EVAL_BATCH_SIZE)])


def ensemble_trust(models, doubts, images, labels, split):
    """The ensemble's Trust: the mean of the models' probabilities, as they give them and at their own
    temperatures (from one pass of each); "not sure" below the mean of their thresholds (an ensemble
    has no detector)."""
    logits = [logits_of(model, images) for model in models]
    raw = torch.stack([torch.softmax(scores, 1) for scores in logits]).mean(0)
    calibrated = torch.stack(
        [torch.softmax(scores / learned.temperature, 1) for scores, learned in zip(logits, doubts)]
    ).mean(0)
    threshold = sum(learned.unsure_below for learned in doubts) / len(doubts)
    verdicts = (calibrated.max(1).values < threshold).long()
    return Trust(split, labels.cpu(), raw, calibrated, verdicts, Doubt(temperature=1.0, unsure_below=threshold))


@torch.inference_mode()
def ensemble_evaluation(models, eval_set, split):
    """The ensemble's answers: the mean of the models' probabilities."""
    started = time.perf_counter()
    images, labels = eval_set
    probabilities = torch.stack([probabilities_of(model, images) for model in models]).mean(0)
    confidence, predicted = probabilities.max(1)
    loss = torch.nn.functional.nll_loss(probabilities.clamp_min(1e-12).log(), labels).item()
    return trainer.Evaluation(
        split, labels.cpu(), predicted.cpu(), confidence.cpu(), loss, time.perf_counter() - started
    )


def evaluate_images(args, runtime, model, learned, dataset):
    """The accuracy on a folder of labelled images, and what the answers were called; exit code 1
    where some could not be read."""
    found = read_labelled(args.images, dataset)
    out_dir = prepare_out_dir(args)
    images = (found.inputs.to(runtime.device), found.labels.to(runtime.device))
    evaluation = trainer.evaluate(model, images, "labelled", runtime)
    trainer.log_accuracy(evaluation, dataset, f"images in {args.images}")
    trust = measure_trust(model, learned, *images, "labelled")
    log_trust(trust)
    metrics = evaluation_metrics(
        args, evaluation, dataset, trust, class_images=found.per_class(dataset), not_read=found.problems
    )
    settings = {"checkpoint": args.checkpoint, "images": args.images, "not read": len(found.problems)}
    title = f"LeNet-5 on {args.images}, {args.checkpoint.name}: {evaluation.accuracy:.2f} % accuracy"
    headline = f"{evaluation.accuracy:.3f} % of {len(evaluation.labels)} images in {args.images} right"
    write_results(out_dir, runtime, images, evaluation, trust, dataset, args.seed, metrics, settings, title, headline)
    return 1 if found.problems else 0


# ----------------------------------------------------------------------------------------------
# A folder of whole numbers: labels.json gives each file's number
# ----------------------------------------------------------------------------------------------


def evaluate_numbers(args, runtime, model, learned, dataset):
    """The share of whole numbers, and of their digits, that are read right from the images that
    labels.json names (its file name to its number, "2026"); metrics.json records every answer.
    Exit code 1 where some could not be read."""
    if dataset.image_kind != "digit":
        raise CliError(
            f"--images {args.images}: {LABELS_FILE} gives numbers, and {args.checkpoint} reads {dataset.title}."
        )
    labels = read_number_labels(args.images)
    out_dir = prepare_out_dir(args)
    answers, problems = {}, []
    for name in labels:
        try:
            gray = open_grayscale(args.images / name)
            answers[name] = read_number(model, learned, gray, runtime.device, dataset)[0]["number"]
        except ImageError as error:
            problems.append(f"{args.images / name}: {error}")
    for problem in problems:
        logger.error("{}", problem)
    if not answers:
        raise CliError(f"--images {args.images}: none of the images in {LABELS_FILE} could be read.", exit_code=1)
    right = sum(answers[name] == labels[name] for name in answers)
    digits = sum(len(labels[name]) for name in answers)
    digits_right = sum(matched_digits(labels[name], answers[name]) for name in answers)
    logger.info(
        "Numbers in {}: {} of {} read right ({:.1f} %); {} of their {} digits ({:.1f} %)",
        args.images, right, len(answers), 100 * right / len(answers), digits_right, digits, 100 * digits_right / digits,
    )  # fmt: skip
    for name in answers:
        if answers[name] != labels[name]:
            logger.info("  {}: read {}, labelled {}", name, answers[name] or "no digit", labels[name])
    files.write_json(out_dir / METRICS_FILE, {
        "command": "evaluate",
        "checkpoint": str(args.checkpoint),
        "dataset": dataset.name,
        "images": str(args.images),
        "numbers": len(answers),
        "numbers_right": 100 * right / len(answers),
        "digits": digits,
        "digits_right": 100 * digits_right / digits,
        "answers": [{"file": name, "label": labels[name], "read": answers[name]} for name in answers],
        "not_read": problems,
    })  # fmt: skip
    logger.info("Wrote {} into {}/", METRICS_FILE, out_dir)
    return 1 if problems else 0


def read_number_labels(folder):
    """labels.json's files and numbers, each checked: a file name in the folder, a number of digits."""
    path = folder / LABELS_FILE
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CliError(f"{path}: cannot be read as JSON ({first_line(error)}).") from None
    example = '{"year.jpg": "2026", "meter.png": "004512"}'
    if not isinstance(labels, dict) or not labels:
        raise CliError(f"{path}: give each image's number, as in {example}.")
    for name, number in labels.items():
        if not (isinstance(number, str) and number.isascii() and number.isdigit()):
            raise CliError(f"{path}: {name}'s number, {number!r}, is not a string of digits, as in {example}.")
        if Path(name).name != name:
            raise CliError(f"{path}: {name!r} is not a file name in {folder} (no folders), as in {example}.")
    return labels


def matched_digits(label, read):
    """How many of the label's digits the answer has, in order (difflib's matching blocks): a digit
    misread costs one, and so does one left out or one too many."""
    return sum(block.size for block in difflib.SequenceMatcher(None, label, read, autojunk=False).get_matching_blocks())


def write_results(out_dir, runtime, eval_set, evaluation, trust, dataset, seed, metrics, settings, title, headline):
    """metrics.json, the evaluation's four figures as training draws them, and a report.html that
    shows them; then say where."""
    files.write_json(out_dir / METRICS_FILE, metrics)
    trainer.draw_evaluation_figures(out_dir, eval_set, evaluation, seed, dataset, trust)
    report.write_evaluation_report(out_dir, runtime, evaluation, dataset, settings, title, headline, trust)
    logger.info("Wrote {} into {}/", ", ".join(WRITES), out_dir)


def evaluation_metrics(args, evaluation, dataset, trust, **more):
    """What metrics.json records of an evaluation: the model, the images, the accuracy overall and per
    class, and how far its answers can be trusted."""
    return {
        "command": "evaluate",
        "checkpoint": str(args.checkpoint),
        "dataset": dataset.name,
        "images": None if args.images is None else str(args.images),  # None: the dataset's test split
        "eval_split": evaluation.split,
        "eval_images": len(evaluation.labels),
        "eval_accuracy": evaluation.accuracy,
        "eval_loss": evaluation.loss,
        "classes": list(dataset.classes),
        "class_accuracy": evaluation.class_accuracy(),
        "confusion_matrix": evaluation.confusion_matrix().tolist(),
        "trust": trust.summary(),
        **more,
    }


def read_labelled(folder, dataset):
    """The folder's images, each problem logged as one line; raises CliError where none can be read."""
    if not folder.is_dir():
        raise CliError(f"--images {folder}: not a folder. Give a folder with one sub-folder per class.")
    try:
        found = own_images.read_folder(folder, dataset)
    except own_images.FolderNotReadable as error:
        raise CliError(f"--images {error}. Give a folder you can read.") from None
    for problem in found.problems:
        logger.error("{}", problem)
    if not len(found.labels):
        names = ", ".join(own_images.folder_name(name) for name in dataset.classes)
        raise CliError(
            f"--images {folder}: no image could be read. It needs one sub-folder per class ({names}) "
            "with images in it.",
            exit_code=1,
        )
    return found
