"""evaluate: a trained model's accuracy on its dataset's test set, or on a folder of your own
labelled images, with the evaluation's figures and report.

    python mnist_recognition.py evaluate --checkpoint outputs/lenet5_mnist.pt
    python mnist_recognition.py evaluate --checkpoint outputs/lenet5_mnist.pt --images my_digits/
"""

import json

from loguru import logger

import mnist_recognition as trainer
from companions import dataset_files, files, own_images, report


def command(args):
    runtime = trainer.Runtime(trainer.pick_device(args.device))
    out_dir = files.prepare_out_dir(args.out_dir)
    model, payload, dataset = files.trained_model(args, runtime.device)
    if args.images is not None:
        return evaluate_images(args, runtime, out_dir, model, dataset)
    if payload.get("eval_split") == "test":
        logger.info("{} recorded {:.3f} % at the end of training", args.checkpoint, payload["eval_accuracy"])
    dataset_files.prepare_files(args.data_dir, dataset, allow_download=not args.no_download)
    test_set = trainer.normalised_split(args.data_dir, dataset, False, args.test_limit, runtime.device)
    evaluation = trainer.evaluate(model, test_set, "test", runtime)
    trainer.log_accuracy(evaluation, dataset)
    settings = {"checkpoint": args.checkpoint, **payload.get("config", {})}
    title = f"LeNet-5 on {dataset.title}, {args.checkpoint.name}: {evaluation.accuracy:.2f} % test accuracy"
    headline = f"{evaluation.accuracy:.3f} % of {len(evaluation.labels)} test images right"
    report.write_evaluation_report(
        out_dir, runtime, test_set, evaluation, dataset, args.seed, settings, title, headline
    )
    logger.info("Wrote {} and {} into {}/", ", ".join(report.EVALUATION_FIGURES), trainer.REPORT_FILE, out_dir)
    return 0


def evaluate_images(args, runtime, out_dir, model, dataset):
    """The accuracy on a folder of labelled images; exit code 1 where some could not be read."""
    found = read_labelled(args.images, dataset)
    images = (found.inputs.to(runtime.device), found.labels.to(runtime.device))
    evaluation = trainer.evaluate(model, images, "labelled", runtime)
    trainer.log_accuracy(evaluation, dataset, f"images in {args.images}")
    metrics = {
        "checkpoint": str(args.checkpoint),
        "images": str(args.images),
        "eval_images": len(evaluation.labels),
        "eval_accuracy": evaluation.accuracy,
        "classes": list(dataset.classes),
        "class_images": found.per_class(dataset),
        "class_accuracy": evaluation.class_accuracy(),
        "confusion_matrix": evaluation.confusion_matrix().tolist(),
        "not_read": found.problems,
    }
    text = json.dumps(metrics, indent=2).encode()
    files.write_atomically(out_dir / trainer.METRICS_FILE, lambda file: file.write(text))
    settings = {"checkpoint": args.checkpoint, "images": args.images, "not read": len(found.problems)}
    title = f"LeNet-5 on {args.images}, {args.checkpoint.name}: {evaluation.accuracy:.2f} % accuracy"
    headline = f"{evaluation.accuracy:.3f} % of {len(evaluation.labels)} images in {args.images} right"
    report.write_evaluation_report(out_dir, runtime, images, evaluation, dataset, args.seed, settings, title, headline)
    written = ", ".join((trainer.METRICS_FILE, *report.EVALUATION_FIGURES))
    logger.info("Wrote {} and {} into {}/", written, trainer.REPORT_FILE, out_dir)
    return 1 if found.problems else 0


def read_labelled(folder, dataset):
    """The folder's images, each problem logged as one line; raises CliError where none can be read."""
    if not folder.is_dir():
        raise trainer.CliError(f"--images {folder}: not a folder. Give a folder with one sub-folder per class.")
    found = own_images.read_folder(folder, dataset)
    for problem in found.problems:
        logger.error("{}", problem)
    if not len(found.labels):
        names = ", ".join(own_images.folder_name(name) for name in dataset.classes)
        raise trainer.CliError(
            f"--images {folder}: no image could be read. It needs one sub-folder per class ({names}) "
            "with images in it.",
            exit_code=1,
        )
    return found
