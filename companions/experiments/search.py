"""search: a study of settings (Optuna's samplers), then its best trials against the baseline over
paired seeds, through compare's own runs and statistics.

    python mnist_recognition.py search --recipe fast --sampler tpe --trials 20 \
        --space "lr=log:3e-3..3e-2" "batch_size=64,128,256" "dropout=0..0.3" "adam_betas=0.9,0.999|0.7,0.9"

The baseline is a training run with the flags given; each trial is the baseline with settings drawn
from --space (search_space.py; the settings compare can vary): a plain training run (seed 0, --no-figures) on the
validation split, in <out-dir>/trials/trial-<n>/, its log in <out-dir>/logs/. The study lives in
Optuna's storage: a journal file in the out-dir, or the one --storage names, which several
processes or machines can share. Rerunning the command continues the study: finished trials are
never trained again; one left running by a process of this machine that no longer exists (killed)
is marked failed and its settings are tried again. Trials that differ from the baseline and score
best are then trained with seeds 0..N-1 beside the baseline (<out-dir>/confirmation/, a compare
folder), so that the answer says whether the winner beats the baseline or only a lucky seed.
search_answer.py writes that answer: search.json, search.md and search.html with its figures.
"""

import math
import os
import socket
import sys
import time
import warnings

from loguru import logger

import mnist_recognition as trainer
from companions.experiments import compare, search_answer, search_space
from companions.training import files
from companions.training.devices import pick_device
from companions.training.errors import CliError, LossDiverged

STUDY_NAME = "search"
STUDY_FILE = "study.journal"  # Optuna's journal storage, the default --storage
WRITES = (files.METRICS_FILE, STUDY_FILE, *search_answer.ANSWER_FILES)
TRIAL_SEED = 0  # every trial trains with this seed, so that trials differ by their settings alone


# ----------------------------------------------------------------------------------------------
# The study: Optuna's storage, sampler and pruner
# ----------------------------------------------------------------------------------------------


def open_storage(storage, out_dir):
    """Optuna's storage: a journal file (the default, or a path), or a database URL (with a
    heartbeat, so that a trial of a killed process on another machine is failed and retried)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    target = storage or str(out_dir / STUDY_FILE)
    try:
        if "://" in target:
            with warnings.catch_warnings(category=optuna.exceptions.ExperimentalWarning, action="ignore"):
                retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)
            return optuna.storages.RDBStorage(
                target, heartbeat_interval=60, grace_period=180, failed_trial_callback=retry
            )
        return optuna.storages.JournalStorage(JournalFileBackend(target))
    except Exception as error:  # Optuna and SQLAlchemy raise many kinds for a storage they cannot open
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CliError(f"--storage {target}: cannot open it ({reason}).") from None


def new_sampler(args, space, trials_so_far, worker):
    """Optuna's sampler; seeded by the trials so far and the worker, so that a resumed study or a
    second worker does not draw the first one's values again."""
    import optuna

    seed = 1000 * trials_so_far + worker
    if args.sampler == "grid":
        return optuna.samplers.GridSampler({dimension.name: dimension.grid() for dimension in space}, seed=seed)
    if args.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def new_pruner(args):
    import optuna

    return optuna.pruners.MedianPruner() if args.prune else optuna.pruners.NopPruner()


def load_study(args, space):
    """The study, as a worker process opens it for itself (its own handle on the storage)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(
        study_name=STUDY_NAME,
        storage=open_storage(args.storage, args.out_dir),
        sampler=new_sampler(args, space, 0, 0),
        pruner=new_pruner(args),
    )


def create_or_check_study(args, storage, description):
    """The study, made where the storage has none; refused where it holds another search's."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, direction="maximize", load_if_exists=True)
    recorded = study.user_attrs.get("search")
    if recorded is None:
        study.set_user_attr("search", description)
    elif recorded != description:
        raise CliError(
            f"{args.storage or args.out_dir / STUDY_FILE} holds a study of another search ({describe(recorded)}); "
            "give another --out-dir or --storage for this one."
        )
    return study


def describe(description):
    if not isinstance(description, dict):
        return "unknown"
    return f"baseline {' '.join(description['baseline']) or 'the defaults'}, space {' '.join(description['space'])}"


# ----------------------------------------------------------------------------------------------
# The trials: each a plain training run, counted until --trials have finished
# ----------------------------------------------------------------------------------------------


def counted(trial):
    """Whether a trial counts towards --trials: it finished, or it failed because its loss diverged
    (a result of its settings; a killed one is tried again instead)."""
    from optuna.trial import TrialState

    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and bool(trial.user_attrs.get("diverged"))
    )


def taken(trial):
    """Whether a trial holds one of --trials' places: it counts, or it is running."""
    from optuna.trial import TrialState

    return counted(trial) or trial.state == TrialState.RUNNING


def trials_left(study, wanted):
    """How many trials are still to start: --trials less those finished and those running."""
    return wanted - sum(map(taken, study.get_trials(deepcopy=False)))


def this_process():
    return f"{socket.gethostname()}:{os.getpid()}"


def retry_abandoned(study, storage):
    """Trials left running by a process of this machine that no longer exists (killed with kill -9,
    or its machine restarted) are marked failed, and their settings queued to be tried again."""
    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner, _, pid = trial.user_attrs.get("process", "").rpartition(":")
        if owner == host and pid.isdigit() and not files.is_running(int(pid)):
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            with warnings.catch_warnings(category=ExperimentalWarning, action="ignore"):
                RetryHeartbeatStaleTrialCallback()(study, storage.get_trial(trial._trial_id))
            logger.info("Trial {} was left running by a process that no longer exists: it runs again", trial.number)


class Surplus(Exception):
    """A trial begun by a process that raced another for the study's last trial: it ends at once."""


def check_needed(study, trial, wanted):
    """Raise Surplus where the trials numbered before this one, finished or running, are --trials
    already (another process started the last one a moment before)."""
    before = [other for other in study.get_trials(deepcopy=False) if other.number < trial.number]
    if sum(map(taken, before)) >= wanted:
        trial.set_user_attr("surplus", True)
        raise Surplus(f"trial {trial.number} is not needed: {wanted} trials are finished or running")


def objective(args, space, base, trial):
    """Train the trial's settings; its accuracy on the validation split."""
    import optuna

    check_needed(trial.study, trial, args.trials)
    trial.set_user_attr("process", this_process())
    spec = search_space.spec_of({dimension.name: dimension.suggest(trial) for dimension in space})
    trial.set_user_attr("spec", spec)
    name = f"trial-{trial.number}"
    flags = [*base, *compare.parse_spec(spec).flags, "--seed", str(TRIAL_SEED), "--no-figures"]
    run_args = trainer.parse_args([*flags, "--out-dir", str(args.out_dir / "trials" / name)])

    def after_epoch(summary):  # the median pruner weighs each evaluated epoch
        if summary["eval_accuracy"] is not None:
            trial.report(summary["eval_accuracy"], summary["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {summary['epoch']}: {summary['eval_accuracy']:.2f} %")

    started = time.perf_counter()
    try:
        with compare.logged_to(args.out_dir / "logs" / f"{name}.log"):
            code = trainer.train_command(run_args, after_epoch=after_epoch)
    except LossDiverged:
        trial.set_user_attr("diverged", True)
        raise
    finally:
        trial.set_user_attr("seconds", time.perf_counter() - started)
    if code != 0:
        raise RuntimeError(f"{name}: training ended with exit code {code}")
    return files.read_json(args.out_dir / "trials" / name / files.METRICS_FILE)["eval_accuracy"]


def work(args, space, base, worker):
    """One worker: trials until --trials have finished or started (by any process on the storage);
    returns how many it ran. A worker whose parent died (killed) ends after its trial."""
    parent, ran = os.getppid(), 0
    study = load_study(args, space)
    while trials_left(study, args.trials) > 0 and os.getppid() == parent:
        study.sampler = new_sampler(args, space, len(study.get_trials(deepcopy=False)), worker)
        study.optimize(
            lambda trial: objective(args, space, base, trial),
            n_trials=1,
            catch=(LossDiverged, Surplus),
            callbacks=[log_trial],
        )
        ran += 1
    return ran


def log_trial(study, trial):
    if trial.user_attrs.get("surplus"):
        return
    value = "" if trial.value is None else f": {trial.value:.2f} %"
    logger.info("Trial {} {}{} ({})", trial.number, trial.state.name.lower(), value, trial.user_attrs.get("spec"))


def start_worker():
    """Each worker: one torch thread, as compare's; its trials' lines and warnings on the console."""
    compare.start_worker()
    log_search_lines()


def log_search_lines():
    logger.add(sys.stderr, level="INFO", filter=__name__, format="{time:HH:mm:ss} | INFO    | {message}")


def run_trials(args, space, base, workers):
    """The trials, `workers` processes at once (each one torch thread), or here when one."""
    compare.learn_detector_first(base)
    if workers == 1:
        with compare.as_in_a_worker():
            log_search_lines()
            return work(args, space, base, 0)
    with compare.worker_pool(workers, start_worker) as pool:
        futures = [pool.submit(work, args, space, base, worker) for worker in range(workers)]
        return sum(future.result() for future in futures)


# ----------------------------------------------------------------------------------------------
# The confirmation: the best trials against the baseline over paired seeds, by compare
# ----------------------------------------------------------------------------------------------


def is_baseline(base, spec):
    """Whether the spec's settings train exactly as the baseline does."""
    return trainer.training_config(trainer.parse_args([*base, *compare.parse_spec(spec).flags])) == (
        trainer.training_config(trainer.parse_args(base))
    )


def contenders(study, base, how_many):
    """The specs of the best complete trials that differ from the baseline, best first, each once."""
    from optuna.trial import TrialState

    complete = sorted(
        study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda trial: (-trial.value, trial.number)
    )
    specs = dict.fromkeys(trial.user_attrs["spec"] for trial in complete)
    return [spec for spec in specs if not is_baseline(base, spec)][:how_many]


def confirm(args, base, specs):
    """compare's summary of the baseline and `specs` over seeds 0..--seeds-1, or None without specs."""
    if not specs or not args.confirm:
        return None
    argv = ["compare", *base, "--vary", *specs, "--seeds", str(args.seeds), "--out-dir", str(confirmation_dir(args))]
    if args.workers:
        argv += ["--workers", str(args.workers)]
    logger.info("Confirming the best {} against the baseline over {} paired seeds", len(specs), args.seeds)
    code = compare.command(trainer.parse_args(argv))
    if code != 0:
        raise CliError("the confirmation's runs did not finish; run the search again to finish them.")
    return files.read_json(confirmation_dir(args) / "compare.json")


def confirmation_dir(args):
    return args.out_dir / "confirmation"


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def check_folder(args, description):
    files.prepare_out_dir(args.out_dir, "search", WRITES)
    marker = args.out_dir / files.METRICS_FILE
    recorded = files.read_json(marker).get("search") if marker.is_file() else None
    if recorded is None:
        files.write_json(marker, {"command": "search", "search": description})
    elif recorded != description:
        raise CliError(
            f"{args.out_dir} holds a search of another baseline or space ({describe(recorded)}); "
            "give another --out-dir for this one."
        )
    files.prepare_folder(args.out_dir / "trials")
    files.prepare_folder(args.out_dir / "logs")


def command(args):
    if not args.space:
        raise CliError("--space: give at least one setting to search, as in --space lr=log:1e-4..3e-2.")
    space = [search_space.parse_dimension(spec) for spec in args.space]
    base = compare.baseline_flags(args)
    search_space.check_space(args.space, base, space)
    if args.sampler == "grid":
        size = math.prod(len(dimension.grid()) for dimension in space)
        if args.trials > size:
            logger.info("The grid has {} points: {} trials, not {}", size, size, args.trials)
            args.trials = size
    # A storage that --storage names is opened before the folder is made, so that one that cannot be
    # opened is said first; the default one lives in the folder.
    storage = open_storage(args.storage, args.out_dir) if args.storage else None
    description = {"baseline": base, "space": list(args.space), "sampler": args.sampler}
    check_folder(args, description)
    storage = storage or open_storage(None, args.out_dir)
    study = create_or_check_study(args, storage, description)
    retry_abandoned(study, storage)
    left = max(0, trials_left(study, args.trials))
    cores = (os.cpu_count() or 1) if pick_device(args.device).type == "cpu" else 1
    workers = max(1, min(args.workers or cores, left))
    where = args.storage or args.out_dir / STUDY_FILE
    logger.info("Search: {} trials by {}, {} still to run, {} at a time; the study: {}", args.trials, args.sampler,
                left, workers, where)  # fmt: skip
    if left:
        run_trials(args, space, base, workers)
    if not study_done(study, args.trials):  # the storage is read anew: every process's trials
        logger.info("Trials of other processes are still running: the last of them to finish writes the answer")
        return 0
    best = contenders(study, base, max(args.confirm, 1))
    confirmation = confirm(args, base, best[: args.confirm])
    summary = search_answer.summarise(
        study, description | {"n_trials": args.trials}, best, confirmation, command_for(args)
    )
    search_answer.write_answer(args.out_dir, summary)
    logger.info(summary["answer"])
    logger.info("Wrote {} into {}/", ", ".join(search_answer.ANSWER_FILES), args.out_dir)
    return 0


def study_done(study, wanted):
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    return sum(map(counted, trials)) >= wanted and not any(trial.state == TrialState.RUNNING for trial in trials)


def command_for(args):
    """What makes a spec's command line: the flags given, but the held-out split (a winner trains on
    the whole training split), and the spec's."""
    flags = compare.given_flags(args)
    if "--validation" in flags:
        at = flags.index("--validation")
        del flags[at : at + 2]
    return lambda spec: ["python", "mnist_recognition.py", *flags, *compare.parse_spec(spec).flags]
