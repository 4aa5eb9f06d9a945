"""Training and evaluation through the real CLI: outputs, determinism, resume, failures."""
import json
import shutil
import signal
import time

import pytest
import torch
from PIL import Image

import mnist_recognition as app
from conftest import QUICK, TEST_COUNT, run_cli, trained_weights as weights

OUTPUTS = {"train_images.png", "test_images.png", "predictions.png", "metrics.json", "lenet5_mnist.pt",
           "checkpoint.pt"}


def metrics_without_timings(out_dir):
    metrics = json.loads((out_dir / "metrics.json").read_text())
    for epoch in metrics["epochs"]:
        del epoch["seconds"]
    del metrics["total_seconds"]
    del metrics["config"]["out_dir"]
    return metrics


def assert_same_run(first, second):
    assert metrics_without_timings(first) == metrics_without_timings(second)
    expected, found = weights(first), weights(second)
    assert all(torch.equal(expected[name], found[name]) for name in expected)


def test_smoke_run_writes_every_output(trained):
    out_dir, result = trained
    assert {path.name for path in out_dir.iterdir()} == OUTPUTS
    for name in ("train_images.png", "test_images.png", "predictions.png"):
        with Image.open(out_dir / name) as image:
            assert image.format == "PNG" and image.size == (600, 600)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["parameters"] == 61_706 and metrics["test_images"] == TEST_COUNT
    assert metrics["config"]["epochs"] == 4 and metrics["config"]["batch_size"] == 32
    assert set(metrics["versions"]) == {"torch", "torchvision"} and metrics["device"] == "cpu"
    assert [epoch["epoch"] for epoch in metrics["epochs"]] == [1, 2, 3, 4]
    assert all({"loss", "train_accuracy", "seconds"} <= set(epoch) for epoch in metrics["epochs"])
    assert metrics["test_accuracy"] > 60  # chance is 10 %
    assert metrics["total_seconds"] > 0
    saved = torch.load(out_dir / "lenet5_mnist.pt", weights_only=True)
    assert saved["test_accuracy"] == metrics["test_accuracy"] and saved["config"]["seed"] == 0
    model = app.LeNet5()
    model.load_state_dict(saved["model"])


def test_smoke_run_logs_what_the_original_did(trained):
    _, result = trained
    log = result.stderr
    assert "Device: cpu" in log and "61,706 parameters" in log
    assert "Epoch 4/4: loss" in log
    assert f"Accuracy of the network on the {TEST_COUNT} test images:" in log


def test_log_lines_every_n_batches(synthetic_data, tmp_path):
    result = run_cli(*QUICK, "--epochs", 1, "--log-interval", 10, "--data-dir", synthetic_data,
                     "--out-dir", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "[Epoch 1, Batch 10] loss:" in result.stderr and "[Epoch 1, Batch 30] loss:" in result.stderr
    assert "[Epoch 1, Batch 40]" not in result.stderr  # 1200 / 32 = 38 batches


def test_same_seed_gives_identical_results(synthetic_data, tmp_path, trained):
    result = run_cli(*QUICK, "--epochs", 4, "--data-dir", synthetic_data, "--out-dir", tmp_path)
    assert result.returncode == 0, result.stderr
    assert_same_run(trained[0], tmp_path)


def test_another_seed_gives_other_weights(synthetic_data, tmp_path):
    result = run_cli(*QUICK, "--epochs", 1, "--seed", 1, "--data-dir", synthetic_data, "--out-dir", tmp_path)
    assert result.returncode == 0, result.stderr
    reference = run_cli(*QUICK, "--epochs", 1, "--data-dir", synthetic_data, "--out-dir", tmp_path / "zero")
    assert reference.returncode == 0
    assert not torch.equal(weights(tmp_path)["features.0.weight"], weights(tmp_path / "zero")["features.0.weight"])


# --- interruptions -------------------------------------------------------------------------------

RESUMABLE = (*QUICK, "--epochs", 3, "--log-interval", 5)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, synthetic_data):
    out_dir = tmp_path_factory.mktemp("uninterrupted")
    result = run_cli(*RESUMABLE, "--data-dir", synthetic_data, "--out-dir", out_dir)
    assert result.returncode == 0, result.stderr
    return out_dir


def wait_for_file(path, job, timeout=120):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert job.process.poll() is None and time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


def test_sigkill_mid_epoch_then_resume_is_bit_exact(synthetic_data, tmp_path, background, uninterrupted):
    args = (*RESUMABLE, "--data-dir", synthetic_data, "--out-dir", tmp_path)
    job = background(*args)
    job.wait_for_line("[Epoch 2, Batch 15]")
    job.kill(signal.SIGKILL)
    job.finish()
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["progress"]["epoch"] == 1
    result = run_cli(*args, "--resume")
    assert result.returncode == 0, result.stderr
    assert "Resuming from" in result.stderr
    assert_same_run(uninterrupted, tmp_path)


def test_sigkill_between_epochs_then_resume_is_bit_exact(synthetic_data, tmp_path, background, uninterrupted):
    args = (*RESUMABLE, "--data-dir", synthetic_data, "--out-dir", tmp_path)
    job = background(*args)
    wait_for_file(tmp_path / "checkpoint.pt", job)  # written at the end of epoch 1
    job.kill(signal.SIGKILL)
    job.finish()
    result = run_cli(*args, "--resume")
    assert result.returncode == 0, result.stderr
    assert_same_run(uninterrupted, tmp_path)
    assert not list(tmp_path.glob(".*.tmp"))  # a killed write's temporary file is cleaned up


def test_sigint_saves_mid_epoch_and_resume_is_bit_exact(synthetic_data, tmp_path, background, uninterrupted):
    args = (*RESUMABLE, "--data-dir", synthetic_data, "--out-dir", tmp_path)
    job = background(*args)
    job.wait_for_line("[Epoch 2, Batch 10]")
    job.kill(signal.SIGINT)
    code, log = job.finish()
    assert code == 130, log
    assert "--resume" in log and "Traceback" not in log
    progress = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["progress"]
    assert progress["epoch"] == 1 and progress["batches_done"] >= 10
    result = run_cli(*args, "--resume")
    assert result.returncode == 0, result.stderr
    assert_same_run(uninterrupted, tmp_path)


def test_resume_can_train_longer(synthetic_data, tmp_path, uninterrupted):
    shutil.copy(uninterrupted / "checkpoint.pt", tmp_path / "checkpoint.pt")
    args = [arg if arg != 3 else 4 for arg in RESUMABLE]
    result = run_cli(*args, "--data-dir", synthetic_data, "--out-dir", tmp_path, "--resume")
    assert result.returncode == 0, result.stderr
    assert "Epoch 4/4" in result.stderr and "Epoch 3/4" not in result.stderr
    assert len(json.loads((tmp_path / "metrics.json").read_text())["epochs"]) == 4


def test_resume_with_other_settings_is_refused(synthetic_data, tmp_path, uninterrupted):
    shutil.copy(uninterrupted / "checkpoint.pt", tmp_path / "checkpoint.pt")
    before = (tmp_path / "checkpoint.pt").read_bytes()
    result = run_cli(*RESUMABLE, "--batch-size", 16, "--lr", 0.01, "--data-dir", synthetic_data,
                     "--out-dir", tmp_path, "--resume")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--batch-size 32 (now 16)" in result.stderr and "--lr 0.001 (now 0.01)" in result.stderr
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_resume_from_a_model_file_without_training_state_is_refused(synthetic_data, tmp_path, trained):
    shutil.copy(trained[0] / "lenet5_mnist.pt", tmp_path / "checkpoint.pt")
    result = run_cli(*RESUMABLE, "--data-dir", synthetic_data, "--out-dir", tmp_path, "--resume")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no training state" in result.stderr


def test_resume_without_a_checkpoint_is_refused(synthetic_data, tmp_path):
    result = run_cli(*RESUMABLE, "--data-dir", synthetic_data, "--out-dir", tmp_path, "--resume")
    assert result.returncode == 2 and "there is no" in result.stderr and "checkpoint.pt" in result.stderr


# --- failures ------------------------------------------------------------------------------------

def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(synthetic_data, tmp_path, uninterrupted):
    shutil.copy(uninterrupted / "checkpoint.pt", tmp_path / "checkpoint.pt")
    before = (tmp_path / "checkpoint.pt").read_bytes()
    result = run_cli(*QUICK, "--lr", "1e30", "--log-interval", 5, "--data-dir", synthetic_data,
                     "--out-dir", tmp_path)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "infinite or NaN in epoch 1, batch" in result.stderr and "lower --lr" in result.stderr
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert not (tmp_path / "metrics.json").exists()


def test_an_output_folder_that_cannot_be_written_is_refused(synthetic_data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    result = run_cli(*QUICK, "--data-dir", synthetic_data, "--out-dir", blocker / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "Cannot write into the output folder" in result.stderr


def test_killed_at_any_moment_outputs_are_old_or_new_never_partial(synthetic_data, tmp_path, background, trained):
    """Kill a second run in the same folder while it writes its outputs: each file is complete."""
    for name in OUTPUTS:
        shutil.copy(trained[0] / name, tmp_path / name)
    for delay in (0.0, 0.05, 0.1, 0.2, 0.4):
        job = background(*QUICK, "--epochs", 1, "--data-dir", synthetic_data, "--out-dir", tmp_path)
        job.wait_for_line("Epoch 1/1: loss")
        time.sleep(delay)
        job.kill(signal.SIGKILL)
        job.finish()
        for name in ("train_images.png", "test_images.png", "predictions.png"):
            with Image.open(tmp_path / name) as image:
                image.load()
        json.loads((tmp_path / "metrics.json").read_text())
        torch.load(tmp_path / "lenet5_mnist.pt", weights_only=True)
        torch.load(tmp_path / "checkpoint.pt", weights_only=True)
