"""evaluate: a trained model's accuracy on its dataset's test set, with the evaluation's figures and report.

python mnist_recognition.py evaluate --checkpoint outputs/lenet5_mnist.pt
"""

from loguru import logger

import mnist_recognition as trainer
from companions import report


def command(args):
    runtime = trainer.Runtime(trainer.pick_device(args.device))
    out_dir = trainer.prepare_out_dir(args.out_dir)
    model, payload, dataset = trainer.trained_model(args, runtime.device)
    if payload.get("eval_split") == "test":
        logger.info("{} recorded {:.3f} % at the end of training", args.checkpoint, payload["eval_accuracy"])
    trainer.prepare_files(args.data_dir, dataset, allow_download=not args.no_download)
    test_set = trainer.normalised_split(args.data_dir, dataset, False, args.test_limit, runtime.device)
    evaluation = trainer.evaluate(model, test_set, "test", runtime)
    trainer.log_accuracy(evaluation, dataset)
    report.write_evaluation_figures(out_dir, test_set, evaluation, args.seed, dataset)
    settings = {"checkpoint": args.checkpoint, **payload.get("config", {})}
    title = f"LeNet-5 on {dataset.title}, {args.checkpoint.name}: {evaluation.accuracy:.2f} % test accuracy"
    headline = f"{evaluation.accuracy:.3f} % of {len(evaluation.labels)} test images right"
    sections = report.report_sections(settings, report.environment(runtime), evaluation, dataset)
    report.write_report(out_dir, title, headline, sections, report.EVALUATION_FIGURES)
    logger.info("Wrote {} and {} into {}/", ", ".join(report.EVALUATION_FIGURES), trainer.REPORT_FILE, out_dir)
    return 0
