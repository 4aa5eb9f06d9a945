"""Files: each written atomically, never over what another command made, and checkpoints read
without running any code they might carry.

A run killed at any moment leaves each file as the old complete one or the new complete one. A
folder of results belongs to the command that wrote it (its metrics.json says which): another
command refuses to write into it. Checkpoints and model files hold only tensors and plain values,
loaded with weights_only=True and checked to hold LeNet-5's weights before anything uses them.
"""

import json
import os
import re
import tempfile

import torch

from companions.training.errors import CliError

CHECKPOINT_FORMAT = 2  # written into every checkpoint and model file; --resume takes only this one

# Every file a command writes into its folder, named here once.
MODEL_FILE, CHECKPOINT_FILE = "lenet5_mnist.pt", "checkpoint.pt"
METRICS_FILE, REPORT_FILE = "metrics.json", "report.html"
CURVES_PNG, CONFUSION_PNG, MISTAKES_PNG = "training_curves.png", "confusion_matrix.png", "mistakes.png"
PREDICTIONS_PNG, TRAIN_IMAGES_PNG = "predictions.png", "train_images.png"
FILTERS_PNG, LAYER_MAPS_PNG, CALIBRATION_PNG = "filters.png", "layer_maps.png", "calibration.png"
EVALUATION_FIGURES = (CONFUSION_PNG, MISTAKES_PNG, PREDICTIONS_PNG, CALIBRATION_PNG)  # what evaluate draws too


def split_images_png(split):
    """test_images.png, or validation_images.png under --validation."""
    return f"{split}_images.png"


def training_figures(split):
    """The figures of a training run, in the report's order."""
    return (CURVES_PNG, *EVALUATION_FIGURES, TRAIN_IMAGES_PNG, split_images_png(split), FILTERS_PNG, LAYER_MAPS_PNG)


# write_atomically's temporary files: .NAME.mnist_recognition-PID.tmp, a name no other program uses.
TEMPORARY = re.compile(r"\..+\.mnist_recognition-(\d+)\.tmp")


def write_atomically(path, write):
    """Write through `write(file)` into a temporary file, then rename it over `path`.

    Killed or failing at any moment, `path` is either the old complete file or the new complete one.
    """
    temporary = path.with_name(f".{path.name}.mnist_recognition-{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as error:
        raise CliError(f"Cannot write {path}: {os_reason(error)}.") from None
    finally:
        temporary.unlink(missing_ok=True)


def first_line(error):
    """An exception's message in one line: its first, or its type's name where it has none."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def os_reason(error):
    """An OSError in the system's words: 'No space left on device', 'Permission denied'."""
    return error.strerror or str(error)


def remove_stale_temporaries(out_dir):
    """Remove what write_atomically left behind in `out_dir` when its process was killed mid-write:
    only its own temporary files, and only those of processes that are no longer running."""
    for path in out_dir.iterdir():
        match = TEMPORARY.fullmatch(path.name)
        if match and not is_running(int(match[1])):
            path.unlink(missing_ok=True)


def is_running(pid):
    try:
        os.kill(pid, 0)  # signal 0 checks that the process exists, and sends nothing
    except ProcessLookupError:
        return False
    except OSError:  # it exists, but belongs to another user
        return True
    return True


def prepare_folder(folder):
    """`folder`, made if needed, once it is checked to take new files; what write_atomically left
    there when killed is removed."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
        remove_stale_temporaries(folder)
    except OSError as error:
        raise CliError(f"Cannot write into the output folder {folder}: {os_reason(error)}.") from None
    return folder


def prepare_out_dir(out_dir, command, writes=()):
    """`out_dir`, prepared for `command`'s results: a folder that holds another command's results,
    or any of the files `writes` that no command of this program made there, is refused."""
    prepare_folder(out_dir)
    try:
        owner = owner_of(out_dir)
    except OSError as error:
        raise CliError(f"Cannot read {out_dir / METRICS_FILE}: {os_reason(error)}.") from None
    if owner not in (None, command):
        held = f"the results of '{owner}'" if owner != FOREIGN else f"a {METRICS_FILE} that this program did not write"
        raise CliError(f"{out_dir} holds {held}, and '{command}' does not write over them. Give another --out-dir.")
    foreign = [name for name in writes if owner is None and (out_dir / name).exists()]
    if foreign:
        raise CliError(
            f"{out_dir} already holds {', '.join(foreign)}, which '{command}' did not write; it was left as "
            f"it is. Give another --out-dir, or move the file away."
        )
    return out_dir


FOREIGN = "another program"


def owner_of(out_dir):
    """The command whose results `out_dir` holds: the one its metrics.json names ('train' for a run
    stopped before it wrote one, which leaves its checkpoint), or None."""
    metrics = out_dir / METRICS_FILE
    if metrics.is_file():
        try:
            recorded = json.loads(metrics.read_bytes())
        except ValueError:
            recorded = None
        if not isinstance(recorded, dict):
            return FOREIGN
        # Files written before metrics.json named their command: only training's has epochs.
        return recorded.get("command") or ("train" if "epochs" in recorded else "evaluate")
    return "train" if (out_dir / CHECKPOINT_FILE).is_file() else None


def read_json(path):
    return json.loads(path.read_bytes())


def write_json(path, value):
    text = json.dumps(value, indent=2).encode()
    write_atomically(path, lambda file: file.write(text))


def on_cpu(value):
    """`value` with every tensor in it copied to the CPU, so that a plain torch.load works anywhere."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {key: on_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(on_cpu(item) for item in value)
    return value


def random_state():
    """torch's global random generators (what dropout draws from), so that a resumed run draws on."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(path, model, optimizer, schedule, progress, config, ran_on):
    """The checkpoint: everything that --resume needs to continue the run bit-exactly."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "config": config,
        "progress": progress.state_dict(),
        "ran_on": ran_on,
        "random_state": random_state(),
    }
    write_atomically(path, lambda file: torch.save(on_cpu(payload), file))


def save_model(path, model, config, evaluation, **more):
    """The model file: the trained weights, how they were trained, the accuracy they reached, and
    `more` where a command records more (finetune: what it was fine-tuned on)."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "config": config,
        "eval_split": evaluation.split,
        "eval_accuracy": evaluation.accuracy,
        **more,
    }
    write_atomically(path, lambda file: torch.save(on_cpu(payload), file))


def read_checkpoint(path):
    """A checkpoint of this program, loaded with weights_only=True: a dict with its "model" weights."""
    if not path.is_file():
        raise CliError(f"{path}: no such checkpoint file.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a foreign or damaged file fails in many ways; none runs code
        reason = first_line(error)
        raise CliError(
            f"{path}: not a readable checkpoint of this program ({reason}). Nothing in it was run."
        ) from None
    weights = payload.get("model") if isinstance(payload, dict) else None
    if not isinstance(weights, dict):
        raise CliError(f"{path}: not a checkpoint of this program (no 'model' weights in it).")
    return payload


def check_weights(path, payload, model):
    """That the checkpoint's weights are `model`'s, by name and shape, and all finite."""
    weights, expected = payload["model"], model.state_dict()
    mismatched = sorted(set(expected) ^ set(weights)) or [
        name
        for name in expected
        if not isinstance(weights[name], torch.Tensor) or weights[name].shape != expected[name].shape
    ]
    if mismatched:
        raise CliError(
            f"{path}: does not hold the weights of the network its settings describe (wrong or missing: "
            f"{', '.join(mismatched)})."
        )
    if not all(torch.isfinite(tensor).all() for tensor in weights.values()):
        raise CliError(f"{path}: holds weights that are not finite numbers.")
