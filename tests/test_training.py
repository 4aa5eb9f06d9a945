"""Training through the command line: outputs, determinism, resume, interruptions, failures."""
import hashlib
import json
import shutil
import signal

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import mnist_recognition as app
from conftest import (QUICK, SCRIPT, TEST_COUNT, assert_same_weights, script_command, train_quietly,
                      trained_weights)

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
    assert_same_weights(first, second)


# --- one run, end to end, as a user starts it ----------------------------------------------------

def test_a_run_writes_every_output(trained):
    out_dir, _ = trained
    assert {path.name for path in out_dir.iterdir()} == OUTPUTS
    for name in ("train_images.png", "test_images.png", "predictions.png"):
        with Image.open(out_dir / name) as image:
            assert image.format == "PNG" and image.size == (600, 600)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["parameters"] == 61_706 and metrics["test_images"] == TEST_COUNT
    assert metrics["config"]["epochs"] == 4 and metrics["config"]["batch_size"] == 32
    assert metrics["versions"] == {"torch": torch.__version__, "torchvision": __import__("torchvision").__version__}
    assert metrics["device"] == "cpu" and metrics["world_size"] == 1
    assert [epoch["epoch"] for epoch in metrics["epochs"]] == [1, 2, 3, 4]
    assert all(epoch["seconds"] > 0 and 0 <= epoch["train_accuracy"] <= 100 for epoch in metrics["epochs"])
    assert metrics["epochs"][-1]["loss"] < metrics["epochs"][0]["loss"]
    assert metrics["test_accuracy"] > 60  # chance is 10 %
    assert metrics["total_seconds"] > sum(epoch["seconds"] for epoch in metrics["epochs"])
    saved = torch.load(out_dir / "lenet5_mnist.pt", weights_only=True)
    assert saved["test_accuracy"] == metrics["test_accuracy"] and saved["config"] == metrics["config"]


def test_metrics_record_a_hash_of_the_code_that_made_them(trained):
    metrics = json.loads((trained[0] / "metrics.json").read_text())
    assert metrics["script_sha256"] == hashlib.sha256(SCRIPT.read_bytes()).hexdigest()[:12]


def test_a_run_logs_what_the_original_did(trained):
    log = trained[1].stderr
    assert "Device: cpu" in log and "61,706 parameters" in log
    assert "1200 training and 300 test images; 4 epochs, batch 32, Adam lr 0.001" in log
    assert "Epoch 4/4: loss" in log
    accuracy = json.loads((trained[0] / "metrics.json").read_text())["test_accuracy"]
    assert f"Accuracy of the network on the {TEST_COUNT} test images: {accuracy:.3f} %" in log
    assert "Traceback" not in log


# --- determinism ---------------------------------------------------------------------------------

def test_same_seed_gives_identical_results_in_process_and_as_a_process(synthetic_data, tmp_path, trained):
    train_quietly(*QUICK, "--epochs", 4, "--data-dir", synthetic_data, "--out-dir", tmp_path)
    assert_same_run(trained[0], tmp_path)


def test_another_seed_gives_other_weights(synthetic_data, tmp_path):
    for seed in (0, 1):
        train_quietly(*QUICK, "--epochs", 1, "--seed", seed, "--data-dir", synthetic_data, "--out-dir", tmp_path / str(seed))
    assert not torch.equal(trained_weights(tmp_path / "0")["features.0.weight"],
                           trained_weights(tmp_path / "1")["features.0.weight"])


def test_log_lines_every_n_batches(synthetic_data, tmp_path, cli):
    result = cli(*QUICK, "--epochs", 1, "--log-interval", 10, "--data-dir", synthetic_data, "--out-dir", tmp_path)
    assert result.code == 0
    assert "[Epoch 1, Batch 10] loss:" in result.log and "[Epoch 1, Batch 30] loss:" in result.log
    assert "[Epoch 1, Batch 40]" not in result.log  # 1200 / 32 = 38 batches


def test_a_training_step_returns_the_summed_loss_and_right_answers_and_learns():
    model = app.new_model(0, torch.device("cpu"))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images, labels = torch.randn(8, 1, 28, 28), torch.arange(8)
    with torch.no_grad():
        logits = model(images)
    before = [parameter.detach().clone() for parameter in model.parameters()]
    loss_sum, correct = app.train_step(model, optimizer, images, labels, loss_divisor=8)
    torch.testing.assert_close(loss_sum, F.cross_entropy(logits, labels, reduction="sum"))
    assert correct == (logits.argmax(1) == labels).sum()
    assert all(not torch.equal(old, new) for old, new in zip(before, model.parameters()))


# --- resuming ------------------------------------------------------------------------------------

# Batches of 8 make an epoch of 150 steps, long enough for a signal to land inside it.
RESUMABLE = (*QUICK, "--epochs", 3, "--batch-size", 8, "--log-interval", 5)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, synthetic_data):
    out_dir = tmp_path_factory.mktemp("uninterrupted")
    train_quietly(*RESUMABLE, "--data-dir", synthetic_data, "--out-dir", out_dir)
    return out_dir


def test_resume_from_the_end_of_an_epoch_is_bit_exact(synthetic_data, tmp_path, uninterrupted, cli):
    flags = (*RESUMABLE, "--data-dir", synthetic_data, "--out-dir", tmp_path)
    assert cli(*flags, "--epochs", 1).code == 0
    result = cli(*flags, "--resume")
    assert result.code == 0 and "Resuming from" in result.log and "1 epochs and 0 batches done" in result.log
    assert "Epoch 1/3" not in result.log
    assert_same_run(uninterrupted, tmp_path)


def test_resume_can_train_longer(synthetic_data, tmp_path, uninterrupted, cli):
    shutil.copy(uninterrupted / "checkpoint.pt", tmp_path / "checkpoint.pt")
    result = cli(*RESUMABLE, "--epochs", 4, "--data-dir", synthetic_data, "--out-dir", tmp_path, "--resume")
    assert result.code == 0
    assert "Epoch 4/4" in result.log and "Epoch 3/4" not in result.log
    assert len(json.loads((tmp_path / "metrics.json").read_text())["epochs"]) == 4


def refused_resume(cli, tmp_path, synthetic_data, *flags):
    """Resume in tmp_path with these flags; checks the refusal left the checkpoint as it was."""
    before = (tmp_path / "checkpoint.pt").read_bytes() if (tmp_path / "checkpoint.pt").exists() else None
    result = cli(*RESUMABLE, "--data-dir", synthetic_data, "--out-dir", tmp_path, "--resume", *flags)
    assert result.code == 2
    if before is not None:
        assert (tmp_path / "checkpoint.pt").read_bytes() == before
    [error] = result.errors()
    return error


def test_resume_with_other_settings_is_refused_naming_each(synthetic_data, tmp_path, uninterrupted, cli):
    shutil.copy(uninterrupted / "checkpoint.pt", tmp_path / "checkpoint.pt")
    error = refused_resume(cli, tmp_path, synthetic_data, "--batch-size", 16, "--lr", 0.01, "--seed", 5)
    assert "--batch-size 8 (now 16)" in error and "--lr 0.001 (now 0.01)" in error and "--seed 0 (now 5)" in error


def test_resume_cannot_go_back_in_epochs(synthetic_data, tmp_path, uninterrupted, cli):
    shutil.copy(uninterrupted / "checkpoint.pt", tmp_path / "checkpoint.pt")
    assert "--epochs 2 cannot go back" in refused_resume(cli, tmp_path, synthetic_data, "--epochs", 2)


def test_resume_from_a_model_file_without_training_state_is_refused(synthetic_data, tmp_path, trained, cli):
    shutil.copy(trained[0] / "lenet5_mnist.pt", tmp_path / "checkpoint.pt")
    assert "no training state" in refused_resume(cli, tmp_path, synthetic_data)


def test_resume_from_another_versions_checkpoint_is_refused(synthetic_data, tmp_path, uninterrupted, cli):
    payload = torch.load(uninterrupted / "checkpoint.pt", weights_only=True)
    payload["progress"]["shuffle_rng"] = payload["progress"].pop("shuffle_state")  # as an older version named it
    torch.save(payload, tmp_path / "checkpoint.pt")
    assert "another version of this program" in refused_resume(cli, tmp_path, synthetic_data)


def test_resume_without_a_checkpoint_is_refused(synthetic_data, tmp_path, cli):
    error = refused_resume(cli, tmp_path, synthetic_data)
    assert "there is no" in error and "checkpoint.pt" in error


# --- interruptions: these are about the process, so they start one -------------------------------

def test_sigkill_mid_epoch_then_resume_is_bit_exact(synthetic_data, tmp_path, background, uninterrupted, cli):
    flags = (*RESUMABLE, "--data-dir", synthetic_data, "--out-dir", tmp_path)
    job = background(script_command(*flags))
    job.wait_for_line("[Epoch 2, Batch 15]")
    job.send(signal.SIGKILL)
    code, log = job.finish()
    assert code == -signal.SIGKILL, log
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["progress"]["epoch"] in (1, 2)
    assert cli(*flags, "--resume").code == 0
    assert_same_run(uninterrupted, tmp_path)


def test_sigint_saves_mid_epoch_and_resume_is_bit_exact(synthetic_data, tmp_path, background, uninterrupted, cli):
    flags = (*RESUMABLE, "--data-dir", synthetic_data, "--out-dir", tmp_path)
    job = background(script_command(*flags))
    job.wait_for_line("[Epoch 2, Batch 10]")
    job.send(signal.SIGINT)
    code, log = job.finish()
    assert code == 130, log
    assert "Traceback" not in log
    assert f"Continue with: python mnist_recognition.py {' '.join(map(str, flags))} --resume" in log
    progress = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["progress"]
    assert progress["epoch"] in (1, 2) and progress["batches_done"] > 0  # saved inside an epoch
    assert not (tmp_path / "metrics.json").exists()
    assert cli(*flags, "--resume").code == 0
    assert_same_run(uninterrupted, tmp_path)


# --- failures ------------------------------------------------------------------------------------

def test_a_non_finite_loss_stops_with_exit_1_and_keeps_the_last_checkpoint(synthetic_data, tmp_path,
                                                                          uninterrupted, cli):
    shutil.copy(uninterrupted / "checkpoint.pt", tmp_path / "checkpoint.pt")
    before = (tmp_path / "checkpoint.pt").read_bytes()
    result = cli(*QUICK, "--lr", "1e30", "--log-interval", 5, "--data-dir", synthetic_data, "--out-dir", tmp_path)
    assert result.code == 1
    [error] = result.errors()
    assert "infinite or NaN in epoch 1, batch" in error and "lower --lr (now 1e+30)" in error
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert not (tmp_path / "metrics.json").exists()


def test_a_diverging_loss_is_its_own_exception_not_a_command_line_error():
    progress = app.Progress(torch.Generator().get_state(), batch_losses=torch.tensor([1.0, float("inf"), 2.0]),
                            batch_correct=torch.zeros(3))
    args = app.parse_args(["--batch-size", "4"])
    with pytest.raises(app.LossDiverged, match="epoch 1, batch 2"):
        app.batch_stats(progress, 0, 3, 12, args, app.Runtime(torch.device("cpu")))
    assert not issubclass(app.LossDiverged, app.CliError)
    assert app.batch_stats(progress, 2, 3, 12, args, app.Runtime(torch.device("cpu"))) == (0.5, 0.0)


def test_an_output_folder_that_cannot_be_written_is_refused_before_training(synthetic_data, tmp_path, cli):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    result = cli(*QUICK, "--data-dir", synthetic_data, "--out-dir", blocker / "out")
    assert result.code == 2 and "Cannot write into the output folder" in result.errors()[0]
    assert "Epoch" not in result.log
