"""Files and checkpoints: atomic writes, leftovers of killed writes, and checkpoints that are
refused without running anything in them."""
import os
import pickle
import random

import pytest
import torch

import mnist_recognition as app
from conftest import draw_digit


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
        app.write_atomically(path, fails_part_way(error))
    if expected is app.CliError:
        assert str(path) in str(raised.value) and "No space left" in str(raised.value)
    assert path.read_bytes() == b"the old complete file"
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_a_write_that_succeeds_replaces_the_file(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_bytes(b"old")
    app.write_atomically(path, lambda file: file.write(b"new"))
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["metrics.json"]


def test_a_killed_writes_temporary_file_is_removed_by_the_next_run(tmp_path):
    """A process killed inside write_atomically leaves `.NAME.PID.tmp`; the next run removes it."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "checkpoint.pt").write_bytes(b"complete")
    (out_dir / ".checkpoint.pt.12345.tmp").write_bytes(b"half")
    (out_dir / "notes.txt").write_text("the user's own file")
    assert app.prepare_out_dir(out_dir) == out_dir
    assert sorted(os.listdir(out_dir)) == ["checkpoint.pt", "notes.txt"]


def test_remove_stale_temporaries_keeps_everything_else(tmp_path):
    for name in (".metrics.json.1.tmp", ".lenet5_mnist.pt.2.tmp", "model.pt", "report.tmp.txt", ".hidden"):
        (tmp_path / name).write_text("x")
    app.remove_stale_temporaries(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [".hidden", "model.pt", "report.tmp.txt"]


def test_an_output_folder_that_cannot_be_created_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(app.CliError, match="Cannot write into the output folder"):
        app.prepare_out_dir(blocker / "out")


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


CHECKPOINTS = {"malicious": malicious, "truncated": truncated, "foreign": foreign, "tampered": tampered,
               "not finite": not_finite, "raw pickle": raw_pickle, "missing": None}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the raw pickle case
@pytest.mark.parametrize("case", CHECKPOINTS)
def test_bad_checkpoints_are_refused_and_nothing_in_them_runs(case, trained, tmp_path, cli):
    checkpoint = tmp_path / "model.pt"
    if CHECKPOINTS[case] is not None:
        CHECKPOINTS[case](checkpoint, trained[0], tmp_path)
    digit = tmp_path / "digit.png"
    draw_digit(1, random.Random(0), size=100, ink=0, paper=255).save(digit)
    result = cli("predict", digit, "--device", "cpu", "--checkpoint", checkpoint)
    assert result.code == 2
    [error] = result.errors()
    assert str(checkpoint) in error
    assert result.stdout == ""
    assert not (tmp_path / "pwned").exists()


def test_a_good_checkpoint_loads_its_weights(trained):
    model, payload = app.load_trained_model(trained[0] / "lenet5_mnist.pt", torch.device("cpu"))
    assert not model.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, payload["model"][name])


def test_checkpoints_and_models_hold_only_cpu_tensors(trained):
    """So that a plain torch.load works on a machine without the GPU they were trained on."""
    def tensors(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):
            yield from (tensor for item in value.values() for tensor in tensors(item))
        elif isinstance(value, (list, tuple)):
            yield from (tensor for item in value for tensor in tensors(item))
    for name in ("checkpoint.pt", "lenet5_mnist.pt"):
        found = list(tensors(torch.load(trained[0] / name, weights_only=True)))
        assert found and all(tensor.device.type == "cpu" for tensor in found)


def test_on_cpu_copies_every_tensor_in_nested_containers():
    nested = {"a": [torch.ones(2), (torch.zeros(1), 3)], "b": {"c": torch.arange(3)}, "d": "text"}
    copied = app.on_cpu(nested)
    assert copied["d"] == "text" and copied["a"][1][1] == 3 and isinstance(copied["a"][1], tuple)
    assert torch.equal(copied["b"]["c"], torch.arange(3)) and copied["a"][0].device.type == "cpu"
