"""Stopping and resuming a run: where it stands (Progress, which the checkpoint holds), Ctrl-C as a
request to stop after the current step, the command that continues it, and the checks a checkpoint
must pass before --resume continues from it."""

import shlex
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from loguru import logger

from companions.training.command_line import as_text
from companions.training.errors import CliError
from companions.training.files import CHECKPOINT_FORMAT, check_weights, read_checkpoint


@dataclass
class Progress:
    """Where a training run stands: everything a checkpoint needs to continue it bit-exactly."""

    shuffle_state: torch.Tensor  # the shuffle generator's state at the start of the current epoch
    epoch: int = 0  # epochs completed
    batches_done: int = 0  # batches completed in the current epoch
    # This process's loss sum and correct count of each batch of the current epoch.
    batch_losses: torch.Tensor = None
    batch_correct: torch.Tensor = None
    history: list = field(default_factory=list)  # one summary per completed epoch (see train_epoch)
    logged_losses: list = field(default_factory=list)  # (epochs done, mean loss) at every log line

    def state_dict(self):
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    def epoch_order(self, sample_count):
        """This epoch's permutation of the training samples, the same in every process."""
        shuffle = torch.Generator().set_state(self.shuffle_state)
        order = torch.randperm(sample_count, generator=shuffle)
        return order, shuffle.get_state()

    def begin_epoch(self, batch_count, device):
        if self.batches_done == 0:
            self.batch_losses, self.batch_correct = torch.zeros(batch_count), torch.zeros(batch_count)
        # Per-batch results stay on the device and are read only when logging, so it never waits on us.
        self.batch_losses, self.batch_correct = self.batch_losses.to(device), self.batch_correct.to(device)

    def record_batch(self, batch, loss_sum, correct):
        self.batch_losses[batch], self.batch_correct[batch] = loss_sum, correct
        self.batches_done = batch + 1

    def end_epoch(self, summary, next_shuffle_state):
        self.history.append(summary)
        self.epoch, self.batches_done, self.shuffle_state = self.epoch + 1, 0, next_shuffle_state


class StopOnInterrupt:
    """Turn the first Ctrl-C into a request to stop after the current step; a second one kills."""

    def __init__(self, enabled):
        self.enabled, self.requested, self.previous = enabled, False, None

    def __enter__(self):
        if self.enabled:
            self.previous = signal.signal(signal.SIGINT, self._request)
        return self

    def _request(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)

    def __exit__(self, *exc_info):
        if self.enabled:
            signal.signal(signal.SIGINT, self.previous)


def log_how_to_resume(script, argv, resumed, progress, checkpoint_path):
    """The warning that says where the run stopped and the command that continues it: this
    interpreter, the script, `argv` as given, and --resume unless it was `resumed` already."""
    command = shlex.join([shown_path(sys.executable), shown_path(script), *argv] + ([] if resumed else ["--resume"]))
    logger.warning(
        "Interrupted in epoch {} after batch {}; saved {}. Continue with: {}",
        progress.epoch + 1,
        progress.batches_done,
        checkpoint_path,
        command,
    )


def shown_path(path):
    """`path` relative to the current folder where it lies inside it (venv/bin/python), else whole."""
    path = Path(path).absolute()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def restore_random_state(saved):
    """torch's global random generators as the checkpoint recorded them (checkpoints written before
    they were recorded leave them as they are)."""
    state = saved.get("random_state", {})
    if "cpu" in state:
        torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resumable_checkpoint(checkpoint_path, model, config, settings, running_on):
    """The checkpoint to resume from, after checking that it holds `model`'s weights and can continue
    a run of `config` (the run's settings, as the checkpoint records them) on `running_on`."""
    if not checkpoint_path.is_file():
        raise CliError(f"--resume: there is no {checkpoint_path} to continue from.")
    saved = read_checkpoint(checkpoint_path)
    if "progress" not in saved:
        raise CliError(f"--resume: {checkpoint_path} holds a trained model but no training state to continue.")
    if saved.get("format") != CHECKPOINT_FORMAT:
        raise CliError(
            f"--resume: {checkpoint_path} was written by another version of this program (checkpoint "
            f"format {saved.get('format', 1)}, this version reads {CHECKPOINT_FORMAT}) and cannot be "
            f"continued. Start a new run, or use another --out-dir."
        )
    # A schedule spans all epochs, so with one --epochs must stay too.
    must_match = [s for s in settings if s.must_match or (s.name == "epochs" and config["schedule"] != "constant")]
    # A setting that an older checkpoint does not record had its default then.
    recorded = {s.name: as_text(saved["config"].get(s.name, s.default)) for s in must_match}
    differences = [
        f"{s.flag} {recorded[s.name]} (now {as_text(config[s.name])})"
        for s in must_match
        if recorded[s.name] != as_text(config[s.name])
    ]
    if differences:
        raise CliError(
            f"--resume: {checkpoint_path} was made with "
            + ", ".join(differences)
            + ". Resume with the same settings, or use another --out-dir."
        )
    check_weights(checkpoint_path, saved, model)
    if saved["progress"]["epoch"] > config["epochs"]:
        raise CliError(
            f"--resume: {checkpoint_path} already holds {saved['progress']['epoch']} epochs; "
            f"--epochs {config['epochs']} cannot go back."
        )
    if saved["ran_on"] != running_on:
        before, now = saved["ran_on"], running_on
        logger.warning(
            "Resuming a run made on {} x {} process(es) on {} x {}: it continues correctly, but no "
            "longer bit-exactly (another device or number of processes adds numbers in another order).",
            before["device"],
            before["world_size"],
            now["device"],
            now["world_size"],
        )
    return saved
