"""The command line: argparse made from the settings table and the recipes that
mnist_recognition.py declares and hands in, each flag's type, and the help that shows every
default and each recipe's value.
"""

import argparse
import difflib
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from companions.training.devices import is_available
from companions.training.files import CHECKPOINT_FILE, MODEL_FILE

AUGMENTATIONS = ("affine", "elastic", "thickness")  # in the order they are drawn and applied

# ----------------------------------------------------------------------------------------------
# What each flag accepts
# ----------------------------------------------------------------------------------------------


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text):
    value = float(text)
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be 0 or a positive number, got {text}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def port_number(text):
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535, got {text}")
    return value


def fraction(text):
    """A number in [0, 1)."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, got {text}")
    return value


def augmentation_list(text):
    """none, or some of AUGMENTATIONS joined by commas; given back in AUGMENTATIONS' order, so
    that one set of augmentations has one spelling in metrics.json and checkpoints."""
    names = {name.strip() for name in text.split(",")}
    if names == {"none"}:
        return "none"
    if not names <= set(AUGMENTATIONS):
        raise argparse.ArgumentTypeError(
            f"must be none, or some of {', '.join(AUGMENTATIONS)} joined by commas (affine,elastic), got {text}"
        )
    return ",".join(name for name in AUGMENTATIONS if name in names)


def adam_betas(text):
    """Two numbers in [0, 1), written B1,B2."""
    try:
        betas = tuple(fraction(part) for part in text.split(","))
    except (ValueError, argparse.ArgumentTypeError):
        betas = ()
    if len(betas) != 2:
        raise argparse.ArgumentTypeError(f"must be two numbers in [0, 1) written B1,B2, got {text}")
    return betas


def layer_widths(text):
    """Four whole numbers of at least 1, written C1,C2,F1,F2: conv1's and conv2's maps, fc1's and
    fc2's units."""
    parts = text.split(",")
    if len(parts) != 4 or not all(part.isascii() and part.strip().isdigit() and int(part) >= 1 for part in parts):
        raise argparse.ArgumentTypeError(f"must be four whole numbers of at least 1 written C1,C2,F1,F2, got {text}")
    return tuple(int(part) for part in parts)


MAX_DEPTH = 8


def network_depth(text):
    """How many 3x3 convolutions each stage adds: a whole number from 0 to MAX_DEPTH."""
    value = int(text)
    if not 0 <= value <= MAX_DEPTH:
        raise argparse.ArgumentTypeError(f"must be a whole number from 0 to {MAX_DEPTH}, got {text}")
    return value


@dataclass(frozen=True)
class Setting:
    """One setting, declared once: argparse, metrics.json, the checkpoint's config and the
    --resume check are all made from the table below."""

    name: str
    default: object  # the original recipe's value; RECIPES may give another
    help: str
    type: object = None  # what argparse converts the value with; None for an on/off flag
    choices: tuple = None
    commands: tuple = ("train",)  # the commands that take it
    must_match: bool = False  # --resume refuses another value: it shapes the run's numbers
    recorded: bool = True  # written into metrics.json and checkpoints

    @property
    def flag(self):
        return flag_for(self.name)


def flag_for(name):
    return "--" + name.replace("_", "-")


# ----------------------------------------------------------------------------------------------
# argparse, made from the table
# ----------------------------------------------------------------------------------------------


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose errors are one line that points to --help."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show each flag's default, except where it would only say None or False; keep the line
    breaks of descriptions and epilogues as written."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def as_text(value):
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def plural(count, word):
    """'1 epoch', '10 epochs'"""
    return f"{count} {word}{'s' * (count != 1)}"


def help_with_defaults(setting, recipes, default):
    """The setting's help, then its default and what each recipe sets it to."""
    by_recipe = [
        f"{recipe}: {as_text(values[setting.name])}" for recipe, values in recipes.items() if setting.name in values
    ]
    if (default is None or default is False) and not by_recipe:
        return setting.help
    return f"{setting.help} (default: {'; '.join([as_text(default)] + by_recipe)})"


# compare takes every setting of a training run, but these: it has a folder of its own, chooses the
# seeds, and resumes whatever is unfinished anyway.
NOT_COMPARED = ("out_dir", "seed", "resume")
# audit's folds are training runs of its own: on the whole training split but their fold, without
# figures or a detector (only their probabilities are used), each finished or not yet begun.
NOT_AUDITED = ("out_dir", "resume", "validation", "exclude", "no_figures", "no_detector")
DEFAULT_RECIPE = {"audit": "fast"}  # the recipe of a command that trains, where not the original


def takes(command, setting):
    """Whether `command` takes `setting` as a flag."""
    if command in ("compare", "search"):
        return "train" in setting.commands and setting.name not in NOT_COMPARED
    if command == "audit":
        return "train" in setting.commands and setting.name not in NOT_AUDITED
    return command in setting.commands


def default_of(setting, command):
    return DEFAULT_RECIPE.get(command, setting.default) if setting.name == "recipe" else setting.default


def add_settings(parser, command, settings, recipes):
    """Add the settings this command takes. Those it does not get on the command line stay unset
    here and are filled in by resolve_settings, from the recipe or the table."""
    for setting in settings:
        if not takes(command, setting):
            continue
        if setting.type is None and setting.choices is None:
            parser.add_argument(setting.flag, action="store_true", default=argparse.SUPPRESS, help=setting.help)
        else:
            parser.add_argument(
                setting.flag,
                type=setting.type,
                choices=setting.choices,
                default=argparse.SUPPRESS,
                help=help_with_defaults(setting, recipes, default_of(setting, command)),
            )


def resolve_settings(args, settings, recipes):
    """Fill every setting not given on the command line: from the recipe, else from the table."""
    recipe = recipes[getattr(args, "recipe", DEFAULT_RECIPE.get(args.command, "original"))]
    args.given = {setting.name for setting in settings if hasattr(args, setting.name)}  # on the command line
    for setting in settings:
        if takes(args.command, setting) and not hasattr(args, setting.name):
            setattr(args, setting.name, recipe.get(setting.name, default_of(setting, args.command)))
    return args


def recipes_epilog(recipes):
    lines = ["recipes (a flag given explicitly wins over its recipe's value):"]
    for name, values in recipes.items():
        flags = " ".join(f"{flag_for(key)} {as_text(value)}" for key, value in values.items())
        lines.append(f"  {name:<8} {flags or 'the original design: every default above'}")
    return "\n".join(lines)


# Each command and what it does, in the order --help lists them.
COMMAND_HELP = {
    "train": "train LeNet-5 (what runs when no command is given)",
    "evaluate": "measure a trained model's accuracy on its dataset's test set, or on your images",
    "predict": "recognise digits (or clothes, with a Fashion-MNIST model) in your own images",
    "serve": "a page to draw a digit or drop a photo on, and see what the network reads",
    "finetune": "teach a trained model your own handwriting, from a folder of labelled images",
    "export": "write a trained model as one ONNX file, checked with ONNX Runtime",
    "compare": "train LeNet-5 and variants of it over paired seeds, and say which differences are real",
    "search": "search settings (grid, random or Bayesian), then check the best against seed noise",
    "audit": "find the labels that are probably wrong, in a split of the dataset or in your own folder",
}


def commands_listed():
    """The commands, a line each, for the descriptions of --help."""
    return "\n".join(f"  {name:<9} {text}" for name, text in COMMAND_HELP.items())


ONNX_TOLERANCE = 1e-5  # the largest difference in any probability that export accepts
INT8_TOLERANCE = 0.1  # points of test accuracy the int8 file may lose against the float one


def export_description():
    return (
        "Write a trained model as one self-contained ONNX file: input 'image' [N, 1, 28, 28], pixels\n"
        "0..1, light on dark (the dataset's normalisation is inside); outputs 'logits' and\n"
        "'probabilities' [N, 10]. Before it is written, ONNX Runtime runs it on the test images (or on\n"
        "random ones when they are not on disk) next to PyTorch; it is refused (exit code 1) unless\n"
        f"every answer is the same and no probability differs by more than {ONNX_TOLERANCE:.0e}."
    )


IMAGE_FOLDER = "a folder of your own labelled images: one sub-folder per class (0..9, or the dataset's class names)"


def default_beside_checkpoint(folder):
    return f"{folder}/ beside --checkpoint: outputs/{folder}/ for the default checkpoint"


def build_parser(settings, recipes):
    parser = ArgumentParser(
        prog="mnist_recognition.py",
        formatter_class=HelpFormatter,
        description=f"LeNet-5 on MNIST, Fashion-MNIST or KMNIST. The commands:\n{commands_listed()}\n"
        "See 'mnist_recognition.py COMMAND --help'.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def add(name, **kwargs):
        kwargs.setdefault("help", COMMAND_HELP[name])
        command = commands.add_parser(name, formatter_class=HelpFormatter, **kwargs)
        add_settings(command, name, settings, recipes)
        if name not in ("train", "compare", "audit"):
            several = name == "evaluate"  # evaluate measures each of several models, and their ensemble
            command.add_argument(
                "--checkpoint",
                type=Path,
                nargs="+" if several else None,
                default=[Path("outputs") / MODEL_FILE] if several else Path("outputs") / MODEL_FILE,
                help=f"a model written by training ({MODEL_FILE} or {CHECKPOINT_FILE})"
                + (
                    "; several: each one's accuracy and their ensemble's (the mean of their probabilities)"
                    if several
                    else ""
                ),
            )
        return command

    add(
        "train",
        epilog=recipes_epilog(recipes),
        description="Train LeNet-5 on MNIST, Fashion-MNIST or KMNIST; this runs when no command is given.\n"
        f"Re-running into the same --out-dir replaces that run's files. The commands:\n{commands_listed()}\n"
        "See 'mnist_recognition.py COMMAND --help'.",
    )
    evaluate = add("evaluate")
    evaluate.add_argument("--images", type=Path, default=None, help=f"{IMAGE_FOLDER}, measured instead of the test set")
    evaluate.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="folder for the evaluation's figures, report.html and metrics.json (default: "
        f"{default_beside_checkpoint('evaluation')}; evaluation-FOLDER/ with --images FOLDER)",
    )
    predict = add("predict")
    predict.add_argument("images", nargs="+", type=Path, help="image files (PNG, JPEG, BMP, GIF, ...)")
    predict.add_argument("--json", action="store_true", help="print the results as one JSON document")
    predict.add_argument(
        "--show",
        type=Path,
        default=None,
        help="write a figure of each input, what the network sees, and its probabilities",
    )
    predict.add_argument(
        "--layers",
        type=Path,
        default=None,
        metavar="FILE.png",
        help="write a figure of one image through every layer of the network, and why it answered",
    )
    serve = add("serve")
    serve.add_argument(
        "--host", default="127.0.0.1", help="the address to listen on; 0.0.0.0 lets other machines reach the page"
    )
    serve.add_argument("--port", type=port_number, default=8000, help="the port to listen on (0: any free one)")
    serve.add_argument(
        "--collect",
        type=Path,
        default=None,
        help="save the drawings and images you label on the page into this folder, one sub-folder "
        "per class (off unless given)",
    )
    finetune = add("finetune")
    finetune.add_argument("--images", type=Path, required=True, help=IMAGE_FOLDER)
    finetune.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="folder for the fine-tuned model and its metrics.json; never the folder of --checkpoint "
        f"(default: {default_beside_checkpoint('finetuned')})",
    )
    finetune.add_argument("--steps", type=positive_int, default=300, help="optimisation steps")
    finetune.add_argument("--lr", type=positive_float, default=3e-4, help="Adam's learning rate")
    finetune.add_argument(
        "--batch-size",
        type=positive_int,
        default=128,
        help="images per step: a quarter yours, augmented, the rest the dataset's",
    )
    finetune.add_argument(
        "--hold-out", type=fraction, default=0.25, help="the share of each class of your images held out, to measure on"
    )
    export = add("export", description=export_description())
    export.add_argument(
        "--out",
        type=Path,
        default=None,
        help="the file to write (default: the checkpoint's path with .onnx, .int8.onnx or .html: "
        f"outputs/{Path(MODEL_FILE).with_suffix('.onnx')} for the default checkpoint)",
    )
    kind = export.add_mutually_exclusive_group()
    kind.add_argument(
        "--int8",
        action="store_true",
        help="quantize the ONNX file to int8 (ONNX Runtime's static quantization, calibrated on training images); "
        f"refused where its test accuracy is more than {INT8_TOLERANCE} points below the float file's",
    )
    kind.add_argument(
        "--html",
        action="store_true",
        help="write one HTML page that holds the model and runs it in a browser, offline: draw or drop a photo, "
        "the answer, its verdict and the inside view, as serve's page",
    )
    add_compare_arguments(add("compare", description=compare_description()))
    add_search_arguments(add("search", description=search_description()))
    add_audit_arguments(add("audit", description=audit_description()))
    return parser


def compare_description():
    return (
        "Train the baseline (these flags) and each variant (the baseline plus one --vary spec) with\n"
        "seeds 0..N-1, the same seeds for every variant, on a validation split unless --test; then\n"
        "compare.json, compare.md and compare.html give each variant's accuracies, mean, SD and\n"
        "95 % interval, and against the baseline its paired difference, the paired t-test's p-value\n"
        "(Holm-corrected over the variants) and a verdict. Rerunning trains only what is missing."
    )


def shard(text):
    """I/N: the I-th of N shares of the runs, I from 0."""
    index, _, count = text.partition("/")
    if not (index.isascii() and index.isdigit() and count.isascii() and count.isdigit() and int(index) < int(count)):
        raise argparse.ArgumentTypeError(f"must be I/N with 0 <= I < N (0/2 and 1/2 share the runs), got {text}")
    return int(index), int(count)


def add_compare_arguments(compare):
    compare.add_argument(
        "--vary",
        nargs="*",
        default=[],
        metavar="SPEC",
        help="a variant per SPEC: settings as name=value joined by commas, as in pool=max, batch_norm=true, "
        '"optimizer=sgd,momentum=0.9", widths=8,16,120,84',
    )
    compare.add_argument("--seeds", type=positive_int, default=5, help="seeds 0..N-1 for every variant")
    compare.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="runs at once, each a process with one torch thread, so that a run gives the same numbers "
        "on any machine (default: the CPU cores; 1: one run at a time, in this process)",
    )
    compare.add_argument(
        "--shard", type=shard, default=None, metavar="I/N", help="run only every N-th run, from the I-th"
    )
    compare.add_argument("--test", action="store_true", help="measure on the test set instead of a validation split")
    compare.add_argument(
        "--out-dir", type=Path, default=Path("outputs") / "compare", help="folder for every run and the comparison"
    )


def search_description():
    return (
        "Search the settings --space gives (those compare can vary) with Optuna: each trial is a training\n"
        "run of the baseline (these flags) with the trial's settings, seed 0, on a validation split.\n"
        "The study is kept in Optuna's storage, so that rerunning the command continues it, and\n"
        "several processes or machines can share it (--storage). Then the best trials that differ from\n"
        "the baseline run again with seeds 0..N-1 beside it (compare's runs and statistics), and\n"
        "search.json, search.md and search.html say whether the winner is better than the baseline or\n"
        "a lucky seed. --space specs: lr=log:1e-4..3e-2 (a log range), dropout=0..0.5 (a linear one),\n"
        "epochs=1..5 (whole numbers), batch_size=32,64,128 (choices), adam_betas=0.9,0.999|0.7,0.9\n"
        "(choices of a value with commas, parted by |), batch_norm=true,false."
    )


def add_search_arguments(search):
    search.add_argument("--space", nargs="*", default=[], metavar="SPEC", help="a setting and its values per SPEC")
    search.add_argument(
        "--sampler",
        choices=("grid", "random", "tpe"),
        default="tpe",
        help="Optuna's sampler: every point of a grid (a range's ends and middle), random draws, or the "
        "Tree-structured Parzen Estimator (Bayesian)",
    )
    search.add_argument("--trials", type=positive_int, default=20, help="finished trials (a grid's points at most)")
    search.add_argument(
        "--prune",
        action="store_true",
        help="stop a trial whose validation accuracy after an epoch is below the "
        "median of earlier trials' at that epoch (Optuna's median pruner; for runs of several epochs)",
    )
    search.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="Optuna's storage to keep the study in, shared by the processes that name it: a journal file's "
        "path (on a disk they share) or a database URL (sqlite:///study.db, postgresql://...) "
        "(default: study.journal in --out-dir)",
    )
    search.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="trials at once, each a process with one torch thread (default: the CPU cores)",
    )
    search.add_argument(
        "--confirm",
        type=non_negative_int,
        default=3,
        help="how many of the best trials run again over paired seeds beside the baseline; 0: none",
    )
    search.add_argument("--seeds", type=positive_int, default=5, help="the confirmation's seeds 0..N-1")
    search.add_argument(
        "--out-dir",
        type=Path,
        default=Path("outputs") / "search",
        help="folder for the trials, the study and the answer",
    )


DEFAULT_FOLDS = 5


def audit_description():
    return (
        "Find the labels that are probably wrong with cleanlab: the images that models which never learned\n"
        "them read as another class, ranked by the probability they give the label, each marked where\n"
        "confident learning counts it an error. --split train: K folds, each a training run\n"
        "(the fast recipe unless --recipe) on the rest of the split, through compare's one-thread workers;\n"
        "rerunning trains only the folds not yet trained. --split test: read by those folds' models as an\n"
        "ensemble, or by the --checkpoint models. --images FOLDER: read by --checkpoint, which must not\n"
        "have learned them. audit.json ranks the suspects, audit.html shows them; nothing is moved or changed."
    )


def add_audit_arguments(audit):
    audited = audit.add_mutually_exclusive_group(required=True)
    audited.add_argument("--split", choices=("train", "test"), help="audit a split of the dataset")
    audited.add_argument("--images", type=Path, default=None, help=f"audit {IMAGE_FOLDER}")
    audit.add_argument(
        "--checkpoint",
        type=Path,
        nargs="+",
        default=None,
        help="the models that read the images instead of the folds' (their ensemble): never for --split train, "
        f"which they learned (default with --images: outputs/{MODEL_FILE})",
    )
    audit.add_argument("--folds", type=int, default=DEFAULT_FOLDS, help="how many folds the training split is cut into")
    audit.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="folds trained at once, each a process with one torch thread (default: the CPU cores)",
    )
    audit.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="folder for the folds, audit.json, audit.html and suspects.png (default: outputs/audit/ for --split "
        "train, outputs/audit-test/ for --split test, audit-FOLDER/ beside --checkpoint for --images FOLDER)",
    )


def parse_args(argv, settings, recipes):
    """The command and its settings, each from the command line, else its recipe, else the table."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(settings, recipes)
    if argv and not argv[0].startswith("-") and argv[0] not in COMMAND_HELP:
        parser.error(f"'{argv[0]}' is not a command{did_you_mean(argv[0])}; the commands are {', '.join(COMMAND_HELP)}")
    if not argv or argv[0] not in COMMAND_HELP:
        argv.insert(0, "train")  # plain `mnist_recognition.py [flags]` trains, as it always did
    args = resolve_settings(parser.parse_args(argv), settings, recipes)
    device = getattr(args, "device", "auto")
    if not is_available(device):
        parser.error(f"--device {device}: {device.upper()} is not available on this machine")
    args.argv = argv  # for the resume command that an interrupted run prints
    return args


def did_you_mean(word):
    close = difflib.get_close_matches(word, COMMAND_HELP, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
