"""compare: train LeNet-5 and its variants over paired seeds, and say which differences are real.

    python mnist_recognition.py compare --vary pool=max batch_norm=true "optimizer=sgd,momentum=0.9" \
        --seeds 5 --recipe fast

The baseline is a training run with the flags given; each variant is the baseline plus one --vary
spec. Every variant trains with seeds 0..N-1, so that seed k is the same starting point, data order
and augmentation for all of them (paired). Each run is a plain training run (--no-figures) in
<out-dir>/runs/<variant>-seed-<k>/, its log in <out-dir>/logs/. Its result (accuracy, per-class
counts, the predictions, and the probabilities for the ensemble) is
<out-dir>/results/<variant>-seed-<k>.json (and .pt), written atomically last, so that a rerun trains
only what has no result yet. Runs go to worker processes of one torch thread each, so that a run
gives the same numbers whatever the machine's cores and --workers: those of a plain training run
under OMP_NUM_THREADS=1. --shard I/N takes every N-th run, so that several machines can share one
folder. Once every result is there, comparison.py makes the answer of them: compare.json,
compare.md, and compare.html with compare.png.
"""

import contextlib
import multiprocessing
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass

import torch
from loguru import logger

import mnist_recognition as trainer
from companions.experiments import comparison
from companions.training import files
from companions.training.command_line import as_text, takes
from companions.training.devices import Runtime, pick_device
from companions.training.errors import CliError

WRITES = (files.METRICS_FILE, *comparison.ANSWER_FILES)
DEFAULT_VALIDATION = 10_000  # images held out of the training split, unless --validation or --test says otherwise


# ----------------------------------------------------------------------------------------------
# The runs: a variant is flags added to the baseline's; a run is one variant with one seed
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    name: str  # "baseline", or the spec as given ("optimizer=sgd,momentum=0.9")
    flags: tuple  # what it adds to the baseline's command line
    settings: tuple = ()  # (name, value) pairs as the spec gives them

    @property
    def slug(self):
        """A file name for it: 'optimizer_sgd_momentum_0.9'."""
        return re.sub(r"[^A-Za-z0-9.]+", "_", self.name).strip("_")


def parse_spec(spec):
    """'optimizer=sgd,momentum=0.9' as a Variant; a comma before a piece without '=' belongs to the
    value before it (widths=8,16,120,84)."""
    pairs = []
    for piece in spec.split(","):
        if "=" in piece:
            name, value = piece.split("=", 1)
            pairs.append([name.strip().replace("-", "_"), value.strip()])
        elif pairs:
            pairs[-1][1] += "," + piece.strip()
        else:
            raise CliError(f"--vary {spec}: write each setting as name=value, as in pool=max.")
    settings = {setting.name: setting for setting in trainer.SETTINGS if takes("compare", setting)}
    flags = []
    for name, value in pairs:
        if name not in settings:
            raise CliError(f"--vary {spec}: {name} is not a setting compare can vary; see 'compare --help'.")
        if settings[name].type is None and settings[name].choices is None:  # an on/off flag
            if value.lower() not in ("true", "false"):
                raise CliError(f"--vary {spec}: {name} is on or off: write {name}=true or {name}=false.")
            flags += [settings[name].flag] if value.lower() == "true" else []
        else:
            flags += [settings[name].flag, value]
    return Variant(spec, tuple(flags), tuple((name, value) for name, value in pairs))


def given_flags(args):
    """The training flags given to the command, as a training command line."""
    flags = []
    for setting in trainer.SETTINGS:
        if setting.name not in args.given or not takes(args.command, setting):
            continue
        value = getattr(args, setting.name)
        if setting.type is None and setting.choices is None:
            flags += [setting.flag] if value else []
        else:
            flags += [setting.flag, as_text(value)]
    return flags


def baseline_flags(args):
    """The baseline's training command line (the seed and folder aside): the flags given, measured on
    a validation split unless they or --test say otherwise."""
    flags = given_flags(args)
    if "validation" not in args.given:
        flags += ["--validation", "0" if getattr(args, "test", False) else str(DEFAULT_VALIDATION)]
    return flags


@dataclass(frozen=True)
class Run:
    variant: Variant
    seed: int
    argv: tuple  # the whole training command line but --out-dir

    def name(self):
        return f"{self.variant.slug}-seed-{self.seed}"


def all_runs(variants, seeds, base):
    """Every run, variant by variant, seed by seed: the order that --shard counts in."""
    return [
        Run(variant, seed, (*base, *variant.flags, "--seed", str(seed)))
        for variant in variants
        for seed in range(seeds)
    ]


def result_path(out_dir, run):
    return out_dir / "results" / f"{run.name()}.json"


def probabilities_path(out_dir, run):
    return result_path(out_dir, run).with_suffix(".pt")


def read_result(out_dir, run):
    """The run's result, or None where it has none (or one of other flags: then it runs again)."""
    path = result_path(out_dir, run)
    if not path.is_file():
        return None
    result = files.read_json(path)
    return result if result.get("argv") == list(run.argv) else None


# ----------------------------------------------------------------------------------------------
# One run: a plain training run, then its answers on the evaluation split
# ----------------------------------------------------------------------------------------------


def train_one(out_dir, run):
    """Train the run in this process, then write its result; returns the result."""
    from companions.using.evaluate import probabilities_of
    from companions.using.trained import load_trained_model

    run_dir = out_dir / "runs" / run.name()
    args = trainer.parse_args([*run.argv, "--no-figures", "--out-dir", str(run_dir)])
    with logged_to(out_dir / "logs" / f"{run.name()}.log"):
        code = trainer.train_command(args)
    if code != 0:
        raise RuntimeError(f"{run.name()}: training ended with exit code {code}")
    model, _ = load_trained_model(run_dir / files.MODEL_FILE, torch.device("cpu"))
    images, labels = evaluation_split(args)
    probabilities = probabilities_of(model, images)
    predictions = probabilities.argmax(1)
    correct = torch.bincount(labels[predictions == labels], minlength=10)
    metrics = files.read_json(run_dir / files.METRICS_FILE)
    result = {
        "variant": run.variant.name,
        "seed": run.seed,
        "argv": list(run.argv),
        "split": metrics["eval_split"],
        "accuracy": metrics["eval_accuracy"],
        "class_correct": correct.tolist(),
        "class_images": torch.bincount(labels, minlength=10).tolist(),
        "predictions": predictions.tolist(),
        "training_seconds": metrics["training_seconds"],
    }
    files.write_atomically(
        probabilities_path(out_dir, run),
        lambda file: torch.save({"probabilities": probabilities.half(), "labels": labels}, file),
    )
    files.write_json(result_path(out_dir, run), result)  # last: its presence says the run is done
    return result


EVALUATION_SPLITS = {}  # this process's: each read once


def evaluation_split(args):
    """The split the runs are measured on, on the CPU."""
    key = (args.data_dir, args.dataset, args.validation, args.test_limit)
    if key not in EVALUATION_SPLITS:
        EVALUATION_SPLITS[key] = trainer.load_data(args, Runtime(torch.device("cpu")))[1]
    return EVALUATION_SPLITS[key]


@contextlib.contextmanager
def logged_to(path):
    """The run's whole log into a file of its own; tqdm, seeing no terminal there, draws no bars."""
    with open(path, "w", encoding="utf-8") as log, contextlib.redirect_stderr(log):
        sink = logger.add(log, level="INFO", format="{time:HH:mm:ss} | {level: <7} | {message}")
        try:
            yield
        finally:
            logger.remove(sink)


def start_worker():
    """Each worker: one torch thread (several processes share the cores); only warnings on the console."""
    torch.set_num_threads(1)
    logger.remove()
    logger.add(sys.stderr, level="WARNING", format="{message}")


@contextlib.contextmanager
def as_in_a_worker():
    """A run in this process as in a worker: one torch thread, only its warnings logged."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    logger.remove()
    logger.add(sys.stderr, level="WARNING", format="{message}")
    try:
        yield
    finally:
        trainer.configure_logging(is_main=True)
        torch.set_num_threads(threads)


def worker_pool(workers, initializer=start_worker):
    """`workers` processes, each set up by `initializer` (one torch thread). Forked where fork is safe
    to have (Linux), as torch's DataLoader workers are: each starts at once, with torch imported, and
    sets its one thread first. Elsewhere, fresh interpreters."""
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    return ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=initializer)


def run_all(out_dir, runs, workers):
    """Train every run without a result, `workers` at a time; logs each as it ends."""
    todo = [run for run in runs if read_result(out_dir, run) is None]
    done = len(runs) - len(todo)
    if done:
        logger.info("{} of {} runs have their result already; training the other {}", done, len(runs), len(todo))
    if not todo:
        return
    learn_detector_first(todo[0].argv)
    for result in each_in_a_worker(train_one, [(out_dir, run) for run in todo], workers):
        done += 1
        log_run(result, done, len(runs))


def each_in_a_worker(work, jobs, workers):
    """work(*job) for every job, `workers` at a time in one-thread processes (with one: in this
    process, as in a worker); yields each result as it ends. An error cancels the jobs not begun."""
    if workers == 1:
        for job in jobs:
            with as_in_a_worker():
                result = work(*job)
            yield result
        return
    with worker_pool(workers) as pool:
        futures = [pool.submit(work, *job) for job in jobs]
        try:
            for future in as_completed(futures):
                yield future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def learn_detector_first(argv):
    """The dataset's "not a digit" detector, kept (or learned once) here with every thread before the
    runs begin, where each one-thread worker would otherwise wait for the first to learn it alone."""
    from companions.doubt.kept_detector import detector_for
    from companions.training.dataset_files import prepare_files

    args = trainer.parse_args(list(argv))
    if args.no_detector:
        return
    dataset = trainer.DATASETS[args.dataset]
    prepare_files(args.data_dir, dataset, allow_download=not args.no_download)
    detector_for(args.data_dir, dataset, pick_device(args.device))


def log_run(result, done, total):
    logger.info(
        "[{}/{}] {} seed {}: {:.2f} % {} accuracy",
        done,
        total,
        result["variant"],
        result["seed"],
        result["accuracy"],
        result["split"],
    )


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def summarise(out_dir, variants, seeds, runs, base):
    """compare.json's content, from every run's result and probabilities, variant by variant."""
    by_variant = {variant.name: [run for run in runs if run.variant == variant] for variant in variants}
    results = {name: [read_result(out_dir, run) for run in chosen] for name, chosen in by_variant.items()}
    probabilities = {name: [probabilities_path(out_dir, run) for run in chosen] for name, chosen in by_variant.items()}
    return comparison.summarise(variants, seeds, results, probabilities, base)


def check_folder(out_dir, base):
    """The folder, compare's, with the baseline of the runs already in it (a metrics.json that
    records it is written at once)."""
    files.prepare_out_dir(out_dir, "compare", WRITES)
    marker = out_dir / files.METRICS_FILE
    if marker.is_file():
        recorded = files.read_json(marker).get("baseline")
        if recorded != base:
            raise CliError(
                f"{out_dir} holds runs of another baseline ({' '.join(recorded or []) or 'the defaults'}); "
                f"give another --out-dir for this one."
            )
    else:
        files.write_json(marker, {"command": "compare", "baseline": base})
    files.prepare_folder(out_dir / "results")
    files.prepare_folder(out_dir / "logs")


def command(args):
    if args.test and "validation" in args.given:
        raise CliError("--test measures on the test set and --validation on a held-out split: give one of them.")
    variants = [Variant("baseline", ()), *(parse_spec(spec) for spec in args.vary)]
    if len({variant.flags for variant in variants}) < len(variants):
        raise CliError("--vary: two variants (or one and the baseline) have the same settings; give each once.")
    base = baseline_flags(args)
    for variant in variants:  # every flag checked before anything trains
        try:
            trainer.check_optimizer_settings(trainer.parse_args([*base, *variant.flags]))
        except SystemExit:
            raise CliError(f"--vary {variant.name}: not a value this program takes (see above).") from None
        except CliError as error:
            raise CliError(f"--vary {variant.name}: {error}") from None
    runs = all_runs(variants, args.seeds, base)
    check_folder(args.out_dir, base)
    mine = runs if args.shard is None else runs[args.shard[0] :: args.shard[1]]
    # On an accelerator the runs would share it: one at a time unless --workers says otherwise.
    cores = (os.cpu_count() or 1) if pick_device(args.device).type == "cpu" else 1
    workers = min(args.workers or cores, max(1, len(mine)))
    logger.info(
        "{} variants x {} seeds: {} runs, {} here, {} at a time",
        len(variants),
        args.seeds,
        len(runs),
        len(mine),
        workers,
    )
    run_all(args.out_dir, mine, workers)
    missing = [run.name() for run in runs if read_result(args.out_dir, run) is None]
    if missing:
        logger.info(
            "{} of {} runs have no result yet (other shards'): compare.json is written once all have",
            len(missing),
            len(runs),
        )
        return 0
    summary = summarise(args.out_dir, variants, args.seeds, runs, base)
    comparison.write_answer(args.out_dir, summary)
    for entry in summary["variants"]:
        logger.info("{}: {:.2f} % mean, {}", entry["name"], entry["mean"], entry.get("verdict", "the baseline"))
    logger.info("Wrote {} into {}/", ", ".join(comparison.ANSWER_FILES), args.out_dir)
    return 0
