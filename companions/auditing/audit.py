"""audit: which labels are probably wrong, in a split of the dataset or in a folder of your own.

    python mnist_recognition.py audit --split train        # -> outputs/audit/audit.json, audit.html
    python mnist_recognition.py audit --split test
    python mnist_recognition.py audit --images my_digits/ --checkpoint outputs/lenet5_mnist.pt

No image is scored by a model that learned it. For the training split, the split is cut into K folds
(seeded); each fold's images are read by a model trained (the fast recipe unless --recipe) on all
the others: a plain training run with --exclude naming the fold, in <out-dir>/runs/, through
compare's one-thread worker processes. Each fold's probabilities are written last, atomically, so
that a rerun trains only the folds that have none. The test split is read by the folds' models as
an ensemble (the mean of their probabilities), or by the --checkpoint models; a folder, by
--checkpoint, refused where that model was fine-tuned on the folder. cleanlab then finds the
suspects (suspects.py). Nothing is moved, renamed or changed: audit prints what a person would do.
"""

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger

import mnist_recognition as trainer
from companions.auditing import suspects
from companions.doubt.verdicts import logits_of
from companions.experiments.compare import each_in_a_worker, given_flags, logged_to
from companions.training import dataset_files, files
from companions.training.datasets import DATASETS
from companions.training.errors import CliError
from companions.training.files import METRICS_FILE, MODEL_FILE
from companions.using import own_images
from companions.using.evaluate import read_labelled
from companions.using.trained import dataset_name, doubt_of, load_trained_model

WRITES = (METRICS_FILE, suspects.AUDIT_JSON, suspects.AUDIT_HTML, suspects.SUSPECTS_PNG)
CPU = torch.device("cpu")
LOGGED_SUSPECTS = 10  # the strongest suspects of a split named in the log; a folder's are all named


@dataclass
class Audited:
    """What is audited: the images as the network takes them (on the CPU), their labels, and for a
    folder each image's file."""

    what: str  # "MNIST's test split", "my_digits/"
    split: str  # "train", "test" or "images"
    dataset: object
    inputs: torch.Tensor
    labels: torch.Tensor
    files: list = None
    problems: int = 0  # the folder's files that could not be read

    def where(self, position):
        return {"file": str(self.files[position])} if self.files is not None else {"index": position}


def command(args):
    if args.folds < 2:
        raise CliError(
            f"--folds {args.folds}: a fold's images are read by a model trained on the others, so it "
            "takes at least 2 folds (5 by default)."
        )
    models = given_models(args)
    dataset = dataset_of(args, models)
    audited = images_of(args, dataset, models)
    out_dir = prepare_folder(args, audited)
    probabilities, read_by = out_of_sample(args, audited, models, out_dir)
    probabilities = suspects.as_rows_of_one(probabilities)
    ranked, scores, confident = suspects.find_suspects(audited.labels, probabilities)
    entries = suspects.suspect_entries(ranked, scores, confident, audited.labels, probabilities, audited.where)
    audit = {
        "what": audited.what,
        "dataset": dataset.name,
        "split": audited.split,
        "images": len(audited.labels),
        "read_by": read_by,
        "method": f"cleanlab {cleanlab_version()}: find_label_issues, predicted_neq_given ranked by "
        f"{suspects.RANKED_BY}; confident: prune_by_noise_rate",
        "confident": sum(entry["confident"] for entry in entries),
        "classes": suspects.confusions(entries, audited.labels, len(dataset.classes)),
        "suspects": entries,
    }
    suspects.write_answer(out_dir, audit, audited.inputs[ranked], dataset)
    log_answer(audit, audited, out_dir)
    return 1 if audited.problems else 0


def cleanlab_version():
    from importlib.metadata import version

    return version("cleanlab")


# ----------------------------------------------------------------------------------------------
# What is audited, and by which models: every check made before anything is written
# ----------------------------------------------------------------------------------------------


def calibrated(path, model, payload, images):
    """The model's probabilities at its own temperature (its calibration): cleanlab counts them as
    meaning what they say, which a label-smoothed model's raw ones do not."""
    return at_temperature(logits_of(model, images), doubt_of(payload, path, CPU).temperature)


def at_temperature(logits, temperature):
    return torch.softmax(logits / temperature, 1)


def given_models(args):
    """[(path, model on the CPU, checkpoint)] for each --checkpoint; refused for the training split."""
    if args.split == "train" and args.checkpoint:
        raise CliError(
            f"--checkpoint {args.checkpoint[0]}: a model trained on the training split has learned the labels "
            "it would check. Leave out --checkpoint: audit --split train reads each fold with a model trained "
            "without it."
        )
    paths = args.checkpoint or ([Path("outputs") / MODEL_FILE] if args.images else [])
    return [(path, *load_trained_model(path, CPU)) for path in paths]


def dataset_of(args, models):
    """The models' dataset (they must share one, and agree with an explicit --dataset), else --dataset."""
    if not models:
        return DATASETS[args.dataset]
    names = {dataset_name(payload) for _, _, payload in models}
    if len(names) > 1:
        raise CliError(f"--checkpoint: the models were trained on different datasets ({', '.join(sorted(names))}).")
    name = names.pop()
    if "dataset" in args.given and args.dataset != name:
        raise CliError(
            f"--dataset {args.dataset}: {models[0][0]} was trained on {name}; it reads only {name}'s images. Leave "
            f"out --dataset, or give a model trained on {args.dataset}."
        )
    return DATASETS[name]


def images_of(args, dataset, models):
    if args.images:
        return folder_images(args.images, dataset, models)
    dataset_files.prepare_files(args.data_dir, dataset, allow_download=not args.no_download)
    train = args.split == "train"
    limit = args.train_limit if train else args.test_limit
    inputs, labels = trainer.normalised_split(args.data_dir, dataset, train, limit, CPU)
    return Audited(f"{dataset.title}'s {'training' if train else 'test'} split", args.split, dataset, inputs, labels)


def folder_images(folder, dataset, models):
    """The folder's images: refused where it has no class sub-folders, or one of a class the model does
    not know, or where a model learned them (fine-tuned on this folder)."""
    names = [own_images.folder_name(name) for name in dataset.classes]
    if not folder.is_dir():
        raise CliError(
            f"--images {folder}: not a folder. Give a folder with one sub-folder per class ({', '.join(names)})."
        )
    sub_folders = sorted(path.name for path in folder.iterdir() if path.is_dir() and not path.name.startswith("."))
    if not sub_folders:
        raise CliError(
            f"--images {folder}: has no class sub-folders. It needs one per class ({', '.join(names)}), "
            "each holding that class's images, as serve --collect writes it."
        )
    unknown = [name for name in sub_folders if name not in names]
    if unknown:
        raise CliError(
            f"--images {folder}: {unknown[0]}/ is not a class the model knows ({dataset.title}: {', '.join(names)})."
        )
    for path, _, payload in models:
        learned = (payload.get("fine_tuned") or {}).get("images")
        if learned and Path(learned).resolve() == folder.resolve():
            raise CliError(
                f"--checkpoint {path}: was fine-tuned on {folder}, so it has learned the labels it would check. Give "
                f"a model that did not learn them, such as the one it was fine-tuned from "
                f"({payload['fine_tuned'].get('from')})."
            )
    found = read_labelled(folder, dataset)
    return Audited(f"{folder}/", "images", dataset, found.inputs, found.labels, found.files, len(found.problems))


def default_out_dir(args):
    if args.images:
        beside = args.checkpoint[0].parent if args.checkpoint else Path("outputs")
        return beside / f"audit-{args.images.resolve().name}"
    return Path("outputs") / ("audit" if args.split == "train" else "audit-test")


def prepare_folder(args, audited):
    """--out-dir, audit's own: refused where it holds the audit of something else."""
    out_dir = args.out_dir or default_out_dir(args)
    files.prepare_out_dir(out_dir, "audit", WRITES)
    marker = out_dir / METRICS_FILE
    if marker.is_file() and files.read_json(marker).get("what") != audited.what:
        raise CliError(
            f"{out_dir} holds the audit of {files.read_json(marker).get('what')}; give another --out-dir for "
            f"{audited.what}'s."
        )
    files.write_json(marker, {"command": "audit", "what": audited.what, "split": audited.split})
    return out_dir


# ----------------------------------------------------------------------------------------------
# Probabilities out of sample: the given models', or the folds'
# ----------------------------------------------------------------------------------------------


def out_of_sample(args, audited, models, out_dir):
    """(each image's probabilities from models that never learned it, which models they were)."""
    if models:
        ensemble = torch.stack([calibrated(*model, audited.inputs) for model in models]).mean(0)
        read_by = ", ".join(str(path) for path, _, _ in models)
        return ensemble, (read_by if len(models) == 1 else f"the ensemble of {read_by}")
    folds = fold_runs(args, out_dir, len(audited.labels) if audited.split == "train" else training_size(args))
    train_all(out_dir, folds, args.workers)
    results = [read_fold(out_dir, fold) for fold in folds]
    read_by = f"{args.folds} folds' models ({args.recipe} recipe, seed {args.seed})"
    if audited.split == "test":
        ensemble = torch.stack([at_temperature(result["test"], result["temperature"]) for result in results]).mean(0)
        return ensemble, f"the ensemble of {read_by}"
    return held_out_probabilities(results, len(audited.labels), len(audited.dataset.classes)), read_by


def held_out_probabilities(results, count, class_count):
    """Every training image's probabilities from the fold model that held it out, at its temperature."""
    probabilities = torch.zeros(count, class_count)
    for result in results:
        probabilities[result["held_out"]] = at_temperature(result["train"], result["temperature"])
    return probabilities


def training_size(args):
    size = len(dataset_files.raw_split(args.data_dir, DATASETS[args.dataset], True)[1])
    return min(size, args.train_limit or size)


@dataclass(frozen=True)
class Fold:
    name: str  # "fold-2-of-5"
    argv: tuple  # the fold's training command line but --out-dir


def fold_runs(args, out_dir, size):
    """The K folds, each a training run without its share of the training split (written as the list
    that its --exclude names)."""
    recipe = [] if "recipe" in args.given else ["--recipe", args.recipe]  # audit's default, not training's
    seed = [] if "seed" in args.given else ["--seed", str(args.seed)]
    base = [*recipe, *given_flags(args), *seed, "--no-detector"]
    order = torch.randperm(size, generator=torch.Generator().manual_seed(args.seed))
    files.prepare_folder(out_dir / "folds")
    folds = []
    for number in range(args.folds):
        name = f"fold-{number}-of-{args.folds}"
        path = out_dir / "folds" / f"{name}.json"
        held_out = sorted(order[number :: args.folds].tolist())
        if not path.is_file() or files.read_json(path) != held_out:
            files.write_json(path, held_out)
        folds.append(Fold(name, (*base, "--exclude", str(path))))
    return folds


def result_path(out_dir, fold):
    return out_dir / "results" / f"{fold.name}.pt"


def read_fold(out_dir, fold):
    """The fold's probabilities, or None where it has none (or of another command line: it trains again)."""
    path = result_path(out_dir, fold)
    if not path.is_file():
        return None
    result = torch.load(path, weights_only=True)
    return result if result.get("argv") == list(fold.argv) else None


def train_all(out_dir, folds, workers):
    todo = [fold for fold in folds if read_fold(out_dir, fold) is None]
    if len(todo) < len(folds):
        logger.info(
            "{} of {} folds are trained already; training the other {}", len(folds) - len(todo), len(folds), len(todo)
        )
    if not todo:
        return
    files.prepare_folder(out_dir / "results")
    files.prepare_folder(out_dir / "logs")
    workers = min(workers or os.cpu_count() or 1, len(todo))
    logger.info("Training {} folds, {} at a time, each a process with one torch thread", len(todo), workers)
    done = len(folds) - len(todo)
    for name, accuracy, held_out in each_in_a_worker(train_fold, [(out_dir, fold) for fold in todo], workers):
        done += 1
        logger.info(
            "[{}/{}] {}: {:.2f} % test accuracy, trained without its {} images",
            done,
            len(folds),
            name,
            accuracy,
            held_out,
        )


def train_fold(out_dir, fold):
    """Train the fold in this process, then write its logits on its own images and on the test split,
    and its temperature."""
    run_dir = out_dir / "runs" / fold.name
    args = trainer.parse_args([*fold.argv, "--no-figures", "--out-dir", str(run_dir)])
    with logged_to(out_dir / "logs" / f"{fold.name}.log"):
        code = trainer.train_command(args)
    if code != 0:
        raise RuntimeError(f"{fold.name}: training ended with exit code {code}")
    model, payload = load_trained_model(run_dir / MODEL_FILE, CPU)
    dataset = DATASETS[args.dataset]
    held_out = torch.tensor(files.read_json(args.exclude), dtype=torch.long)
    train_images = split_on_cpu(args.data_dir, dataset, True, args.train_limit)
    test_images = split_on_cpu(args.data_dir, dataset, False, args.test_limit)
    result = {
        "argv": list(fold.argv),
        "held_out": held_out,
        "train": logits_of(model, train_images[held_out]),
        "test": logits_of(model, test_images),
        "temperature": doubt_of(payload, run_dir / MODEL_FILE, CPU).temperature,
    }
    files.write_atomically(result_path(out_dir, fold), lambda file: torch.save(result, file))
    accuracy = files.read_json(run_dir / METRICS_FILE)["eval_accuracy"]
    return fold.name, accuracy, len(held_out)


SPLITS = {}  # this process's images of each split: each read once


def split_on_cpu(data_dir, dataset, train, limit):
    key = (data_dir, dataset.name, train, limit)
    if key not in SPLITS:
        SPLITS[key] = trainer.normalised_split(data_dir, dataset, train, limit, CPU)[0]
    return SPLITS[key]


# ----------------------------------------------------------------------------------------------
# What a person does with the answer
# ----------------------------------------------------------------------------------------------


def log_answer(audit, audited, out_dir):
    entries, classes = audit["suspects"], audited.dataset.classes
    logger.info(
        "{}: {} suspects among {} images ({:.2f} %), read by {}; confident learning counts {} of them label errors",
        audit["what"],
        len(entries),
        audit["images"],
        100 * len(entries) / max(1, audit["images"]),
        audit["read_by"],
        audit["confident"],
    )
    shown = entries if audited.split == "images" else entries[:LOGGED_SUSPECTS]
    for entry in shown:
        logger.info(
            "  {}: given {}, reads {} ({} for its label{}){}",
            suspects.name_of(entry) if "index" in entry else entry["file"],
            classes[entry["given"]],
            classes[entry["suggested"]],
            suspects.percent(entry["score"]),
            "; a confident error" if entry["confident"] else "",
            fix_of(entry, audited) if audited.split == "images" else "",
        )
    logger.info("Wrote {} into {}/; see {}", ", ".join(WRITES[1:]), out_dir, out_dir / suspects.AUDIT_HTML)
    json_path = out_dir / suspects.AUDIT_JSON
    if audited.split == "train":
        logger.info(
            "Train without them: mnist_recognition.py --exclude {}; whether that helps: compare --vary exclude={}",
            json_path,
            json_path,
        )
    elif audited.split == "images":
        logger.info(
            "Nothing was moved. Fine-tune without them: finetune --images {} --exclude {}",
            shlex.quote(str(audited.what[:-1])),
            json_path,
        )


def fix_of(entry, audited):
    """The command that moves a suspect into the folder of the class it reads as (-i: mv asks before
    replacing a file of the same name there)."""
    path = Path(entry["file"])
    target = path.parent.parent / own_images.folder_name(audited.dataset.classes[entry["suggested"]])
    return f": mv -i {shlex.quote(str(path))} {shlex.quote(str(target))}/"
