"""companions/training/files.py: atomic writes, leftovers of killed writes, and checkpoints that are
refused without running anything in them."""

import json
import os
import pickle
import random
import subprocess
import sys

import pytest
import torch
from conftest import draw_digit

import mnist_recognition as app
from companions.training import devices, files
from companions.using import trained

# --- atomic writes -------------------------------------------------------------------------------


def fails_part_way(error):
    def write(file):
        file.write(b"the first half of a new file")
        raise error

    return write


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), RuntimeError("a bug in the writer")])
def test_a_write_that_fails_part_way_leaves_the_old_file_and_no_temporary(tmp_path, error):
    path = tmp_path / "metrics.json"
    path.write_bytes(b"the old complete file")
    expected = app.CliError if isinstance(error, OSError) else RuntimeError
    with pytest.raises(expected) as raised:
        files.write_atomically(path, fails_part_way(error))
    if expected is app.CliError:
        assert str(path) in str(raised.value) and "No space left" in str(raised.value)
    assert path.read_bytes() == b"the old complete file"
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_a_write_that_succeeds_replaces_the_file(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_bytes(b"old")
    files.write_atomically(path, lambda file: file.write(b"new"))
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["metrics.json"]


def test_a_killed_writes_temporary_file_is_removed_by_the_next_run(tmp_path):
    """A process killed inside write_atomically leaves `.NAME.mnist_recognition-PID.tmp`; the next run removes it."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "checkpoint.pt").write_bytes(b"complete")
    (out_dir / f".checkpoint.pt.mnist_recognition-{dead_pid()}.tmp").write_bytes(b"half")
    (out_dir / "notes.txt").write_text("the user's own file")
    assert files.prepare_out_dir(out_dir, "train") == out_dir
    assert sorted(os.listdir(out_dir)) == ["checkpoint.pt", "notes.txt"]


def dead_pid():
    """The pid of a process that has ended."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_only_this_programs_temporaries_of_ended_processes_are_removed(tmp_path):
    ours_of_an_ended_process = f".metrics.json.mnist_recognition-{dead_pid()}.tmp"
    ours_still_being_written = f".lenet5_mnist.pt.mnist_recognition-{os.getpid()}.tmp"
    foreign = (
        ".notes.tmp",
        ".metrics.json.1.tmp",
        "model.pt",
        "report.tmp.txt",
        ".hidden",
        ".x.mnist_recognition-a.tmp",
    )
    for name in (ours_of_an_ended_process, ours_still_being_written, *foreign):
        (tmp_path / name).write_text("x")
    files.remove_stale_temporaries(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([ours_still_being_written, *foreign])


def test_an_output_folder_that_cannot_be_created_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(app.CliError, match="Cannot write into the output folder"):
        files.prepare_out_dir(blocker / "out", "train")


# --- a folder belongs to the command that wrote it -----------------------------------------------


@pytest.mark.parametrize(
    "metrics, owner",
    [
        ({"command": "finetune"}, "finetune"),
        ({"command": "evaluate"}, "evaluate"),
        ({"config": {}, "epochs": []}, "train"),  # written before metrics.json named its command
        ({"images": "mine", "eval_accuracy": 90.0}, "evaluate"),
    ],
)
def test_a_folder_belongs_to_the_command_its_metrics_name(metrics, owner, tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert files.owner_of(tmp_path) == owner
    others = {"train", "evaluate", "finetune"} - {owner}
    for command in others:
        with pytest.raises(app.CliError, match=f"holds the results of '{owner}', and '{command}' does not write"):
            files.prepare_out_dir(tmp_path, command)
    assert files.prepare_out_dir(tmp_path, owner) == tmp_path


def test_a_stopped_training_runs_folder_is_trainings(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"a training state")
    assert files.owner_of(tmp_path) == "train"
    with pytest.raises(app.CliError, match="'evaluate' does not write over them"):
        files.prepare_out_dir(tmp_path, "evaluate")


def test_a_folder_with_a_foreign_metrics_file_or_a_file_no_command_wrote_is_refused(tmp_path):
    (tmp_path / "metrics.json").write_text("not json")
    with pytest.raises(app.CliError, match="holds a metrics.json that this program did not write"):
        files.prepare_out_dir(tmp_path, "train")
    (tmp_path / "metrics.json").unlink()
    (tmp_path / "report.html").write_text("the user's own page")
    with pytest.raises(app.CliError, match=r"already holds report.html, which 'train' did not write"):
        files.prepare_out_dir(tmp_path, "train", ("lenet5_mnist.pt", "report.html"))
    assert (tmp_path / "report.html").read_text() == "the user's own page"


# --- checkpoints that are refused ----------------------------------------------------------------


class CreatesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def malicious(path, trained, tmp_path):
    torch.save({"model": CreatesAFile(tmp_path / "pwned")}, path)


def truncated(path, trained, tmp_path):
    path.write_bytes((trained / "lenet5_mnist.pt").read_bytes()[:5000])


def foreign(path, trained, tmp_path):
    torch.save({"weights": torch.zeros(3)}, path)


def tampered(path, trained, tmp_path):
    payload = torch.load(trained / "lenet5_mnist.pt", weights_only=True)
    payload["model"]["features.0.weight"] = torch.zeros(6, 1, 3, 3)
    torch.save(payload, path)


def not_finite(path, trained, tmp_path):
    payload = torch.load(trained / "lenet5_mnist.pt", weights_only=True)
    payload["model"]["classifier.4.bias"][3] = float("nan")
    torch.save(payload, path)


def raw_pickle(path, trained, tmp_path):
    path.write_bytes(pickle.dumps(CreatesAFile(tmp_path / "pwned")))


CHECKPOINTS = {
    "malicious": malicious,
    "truncated": truncated,
    "foreign": foreign,
    "tampered": tampered,
    "not finite": not_finite,
    "raw pickle": raw_pickle,
    "missing": None,
}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the raw pickle case
@pytest.mark.parametrize("command", ["predict", "export"])
@pytest.mark.parametrize("case", CHECKPOINTS)
def test_bad_checkpoints_are_refused_and_nothing_in_them_runs(case, command, trained, tmp_path, cli):
    checkpoint = tmp_path / "model.pt"
    if CHECKPOINTS[case] is not None:
        CHECKPOINTS[case](checkpoint, trained[0], tmp_path)
    digit = tmp_path / "digit.png"
    draw_digit(1, random.Random(0), size=100, ink=0, paper=255).save(digit)
    extra = [digit, "--device", "cpu"] if command == "predict" else ["--out", tmp_path / "model.onnx"]
    result = cli(command, *extra, "--checkpoint", checkpoint)
    assert result.code == 2
    [error] = result.errors()
    assert str(checkpoint) in error
    assert result.stdout == ""
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "model.onnx").exists()


# --- checkpoints of a run on another device ------------------------------------------------------
# This machine may have no GPU, so a tensor subclass stands for a GPU tensor: like one, it gives a
# plain CPU tensor only through .cpu(), and torch.load(weights_only=True) refuses to load it.


class OnAnotherDevice(torch.Tensor):
    __torch_function__ = torch._C._disabled_torch_function_impl  # operations on it give plain tensors

    def cpu(self, *args, **kwargs):
        return self.as_subclass(torch.Tensor).clone()


def on_another_device(value):
    if isinstance(value, torch.Tensor):
        return value.detach().as_subclass(OnAnotherDevice)
    if isinstance(value, dict):
        return {key: on_another_device(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(on_another_device(item) for item in value)
    return value


def tensors_in(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        yield from (tensor for item in value.values() for tensor in tensors_in(item))
    elif isinstance(value, (list, tuple)):
        yield from (tensor for item in value for tensor in tensors_in(item))


def test_on_cpu_copies_every_tensor_in_nested_containers():
    nested = on_another_device({"a": [torch.ones(2), (torch.zeros(1), 3)], "b": {"c": torch.arange(3)}, "d": "text"})
    copied = files.on_cpu(nested)
    assert copied["d"] == "text" and copied["a"][1][1] == 3 and isinstance(copied["a"][1], tuple)
    assert torch.equal(copied["b"]["c"], torch.arange(3)) and torch.equal(copied["a"][0], torch.ones(2))
    assert [type(tensor) for tensor in tensors_in(copied)] == [torch.Tensor] * 3


@pytest.fixture
def model_on_another_device(monkeypatch):
    """A model, its Adam optimiser after one step, its schedule and a Progress, all of whose
    state_dicts hold 'GPU' tensors."""
    args = app.parse_args(["--device", "cpu"])
    model = app.new_model(0, torch.device("cpu"))
    optimizer = app.new_optimizer(model, args)
    schedule = app.new_schedule(optimizer, args, steps_per_epoch=10)
    app.train_step(model, optimizer, schedule, torch.randn(4, 1, 28, 28), torch.arange(4), loss_divisor=4)
    for owner in (model, optimizer):
        monkeypatch.setattr(owner, "state_dict", lambda state_dict=owner.state_dict: on_another_device(state_dict()))
    progress = app.Progress(
        on_another_device(torch.Generator().get_state()),
        batch_losses=on_another_device(torch.ones(3)),
        batch_correct=on_another_device(torch.ones(3)),
    )
    return args, model, optimizer, schedule, progress


def test_a_checkpoint_of_a_run_on_another_device_holds_only_cpu_tensors(model_on_another_device, tmp_path):
    """So that a plain torch.load works on a machine without the GPU it was trained on."""
    args, model, optimizer, schedule, progress = model_on_another_device
    runtime = devices.Runtime(torch.device("cpu"))
    config = app.training_config(args)
    files.save_checkpoint(
        tmp_path / "checkpoint.pt", model, optimizer, schedule, progress, config, devices.ran_on(runtime)
    )
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    found = list(tensors_in(saved))
    assert len(found) > 20 and all(type(tensor) is torch.Tensor for tensor in found)
    assert saved["format"] == files.CHECKPOINT_FORMAT
    for name, tensor in model.state_dict().items():
        assert torch.equal(saved["model"][name], tensor.as_subclass(torch.Tensor))


def test_a_model_file_of_a_run_on_another_device_loads_its_weights_on_the_cpu(model_on_another_device, tmp_path):
    _, model, _, _, _ = model_on_another_device
    evaluation = app.Evaluation("test", torch.tensor([1, 2]), torch.tensor([1, 3]), torch.ones(2), 0.5, 0.1)
    files.save_model(tmp_path / "lenet5_mnist.pt", model, {"dataset": "mnist"}, evaluation)
    loaded, payload = trained.load_trained_model(tmp_path / "lenet5_mnist.pt", torch.device("cpu"))
    assert (payload["eval_split"], payload["eval_accuracy"], payload["format"]) == (
        "test",
        50.0,
        files.CHECKPOINT_FORMAT,
    )
    assert not loaded.training
    assert loaded.features[3].weight.is_contiguous(memory_format=torch.channels_last)  # the CPU's fastest layout
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.as_subclass(torch.Tensor))
    assert not torch.equal(loaded.features[0].weight, app.LeNet5().features[0].weight)  # not a fresh model
