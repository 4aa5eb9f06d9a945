"""Training through the command line: outputs, determinism, resume, interruptions, failures."""

import copy
import errno
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    PROMISED_RECIPES,
    QUICK,
    QUICK_WITH_FIGURES,
    SCRIPT,
    TEST_COUNT,
    assert_same_weights,
    interrupt_at,
    paused_command,
    run_process,
    train_quietly,
    trained_weights,
)
from PIL import Image

import mnist_recognition as app
from companions.training import augment as kernels
from companions.training import devices, files, resume

MNIST_DATA = app.DATASETS["mnist"]


def training_batch(train_set, global_batch, args, runtime, epoch, number):
    """This process's share of a global batch, as the training DataLoader fetches it: (images, labels)."""
    batch = app.Batch(epoch, number, global_batch, slice(runtime.rank, None, runtime.world_size))
    return app.training_split(train_set, args).__getitems__(batch)


OUTPUTS = {
    "train_images.png",
    "test_images.png",
    "predictions.png",
    "training_curves.png",
    "confusion_matrix.png",
    "mistakes.png",
    "calibration.png",
    "filters.png",
    "layer_maps.png",
    "report.html",
    "metrics.json",
    "lenet5_mnist.pt",
    "checkpoint.pt",
}
FIGURE_SIZES = {
    "train_images.png": (600, 600),
    "test_images.png": (600, 600),
    "predictions.png": (600, 600),
    "mistakes.png": (600, 600),
    "training_curves.png": (1000, 400),
    "confusion_matrix.png": (700, 600),
    "filters.png": (900, 550),
    "calibration.png": (1000, 420),
}


def metrics_without_timings(out_dir):
    metrics = json.loads((out_dir / "metrics.json").read_text())
    for epoch in metrics["epochs"]:
        del epoch["seconds"], epoch["eval_seconds"]
    del metrics["total_seconds"], metrics["training_seconds"], metrics["timeline"]
    del metrics["config"]["out_dir"]
    return metrics


def assert_same_run(first, second):
    """The same numbers everywhere: metrics (timings aside), weights, and every figure."""
    assert metrics_without_timings(first) == metrics_without_timings(second)
    assert_same_weights(first, second)
    for figure in FIGURE_SIZES:
        assert (first / figure).read_bytes() == (second / figure).read_bytes(), figure


# --- one run, end to end, as a user starts it ----------------------------------------------------


def test_a_run_writes_every_output(trained):
    out_dir, _ = trained
    assert {path.name for path in out_dir.iterdir()} == OUTPUTS
    for name, size in FIGURE_SIZES.items():
        with Image.open(out_dir / name) as image:
            assert image.format == "PNG" and image.size == size, name
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["parameters"] == 61_706
    assert (metrics["eval_split"], metrics["eval_images"]) == ("test", TEST_COUNT)
    assert metrics["config"]["epochs"] == 4 and metrics["config"]["batch_size"] == 32
    torchvision_version = __import__("torchvision").__version__  # 0.29.1+cu130: the installed 0.29.1, a CUDA build
    assert metrics["versions"] == {"torch": torch.__version__, "torchvision": torchvision_version.split("+")[0]}
    assert metrics["device"] == "cpu" and metrics["world_size"] == 1
    assert [epoch["epoch"] for epoch in metrics["epochs"]] == [1, 2, 3, 4]
    assert all(
        set(epoch) == {"epoch", "loss", "train_accuracy", "seconds", "eval_loss", "eval_accuracy", "eval_seconds"}
        for epoch in metrics["epochs"]
    )
    assert metrics["epochs"][-1]["eval_accuracy"] == metrics["eval_accuracy"]
    assert metrics["training_seconds"] == sum(epoch["seconds"] for epoch in metrics["epochs"])
    assert metrics["epochs"][-1]["loss"] < metrics["epochs"][0]["loss"]
    assert metrics["epochs"][-1]["eval_loss"] < metrics["epochs"][0]["eval_loss"]
    assert metrics["eval_accuracy"] > 60  # chance is 10 %
    saved = torch.load(out_dir / "lenet5_mnist.pt", weights_only=True)
    assert saved["eval_accuracy"] == metrics["eval_accuracy"] and saved["config"] == metrics["config"]
    assert saved["eval_split"] == "test" and saved["format"] == files.CHECKPOINT_FORMAT


@pytest.mark.slow
def test_evaluation_is_timed_apart_from_the_training_epochs(synthetic_data, tmp_path, monkeypatch, cli):
    """Each epoch's seconds are its training alone; the total counts everything."""
    evaluate, pause = app.evaluate, 1.5

    def slow_evaluate(*args):
        time.sleep(pause)
        return evaluate(*args)

    monkeypatch.setattr(app, "evaluate", slow_evaluate)
    flags = (*QUICK, "--train-limit", 64, "--test-limit", 32, "--data-dir", synthetic_data, "--out-dir", tmp_path)
    assert cli(*flags).code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert all(epoch["seconds"] < pause for epoch in metrics["epochs"])  # two batches of 32, well under a second
    assert metrics["total_seconds"] >= metrics["training_seconds"] + 2 * pause
    timeline = metrics["timeline"]
    assert timeline["evaluated"] - timeline["data_loaded"] >= metrics["training_seconds"] + 2 * pause


def test_the_timeline_of_a_run_in_its_own_process_is_in_order(trained):
    """Stamps for benchmarks/time_to_accuracy.py's breakdown of the wall time, written last."""
    out_dir, _ = trained
    timeline = json.loads((out_dir / "metrics.json").read_text())["timeline"]
    assert list(timeline) == ["started", "imported", "main", "data_loaded", "evaluated", "doubt_learned", "written"]
    stamps = list(timeline.values())
    assert stamps == sorted(stamps)
    assert timeline["imported"] - timeline["started"] > 0.1  # torch alone takes longer than that to import
    newest_output = max(path.stat().st_mtime for path in out_dir.iterdir() if path.name != "metrics.json")
    coarse = 0.05  # file times come from a clock that may lag time.time() by a tick
    assert newest_output <= timeline["written"] <= (out_dir / "metrics.json").stat().st_mtime + coarse


def test_metrics_record_a_hash_of_the_code_that_made_them(trained):
    """Of every source file a run may use: the script, then the companions' Python files, pages and scripts."""
    companions = SCRIPT.parent / "companions"
    sources = [SCRIPT, *sorted(companions.rglob("*.py")), *sorted(companions.rglob("*.html"))]
    sources += sorted(companions.rglob("*.js"))
    metrics = json.loads((trained[0] / "metrics.json").read_text())
    assert metrics["script_sha256"] == hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:12]
    assert len(sources) >= 40


def test_a_run_logs_what_the_original_did(trained):
    log = trained[1].stderr
    assert "Device: cpu" in log and "61,706 parameters" in log
    assert "1200 training and 300 test images of MNIST; 4 epochs, batch 32, Adam lr 0.001" in log
    assert re.search(
        r"Epoch 4/4: loss \d\.\d{4}, train accuracy \d+\.\d\d %, test loss \d\.\d{4}, "
        r"test accuracy \d+\.\d\d %, \d+\.\d s\n",
        log,
    )
    accuracy = json.loads((trained[0] / "metrics.json").read_text())["eval_accuracy"]
    assert f"Accuracy of the network on the {TEST_COUNT} test images: {accuracy:.3f} %" in log
    assert "Traceback" not in log


# --- determinism ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_same_seed_gives_identical_results_in_process_and_as_a_process(synthetic_data, tmp_path, trained):
    train_quietly(*QUICK_WITH_FIGURES, "--epochs", 4, "--data-dir", synthetic_data, "--out-dir", tmp_path)
    assert_same_run(trained[0], tmp_path)


@pytest.mark.slow
def test_another_seed_gives_other_weights(synthetic_data, tmp_path):
    for seed in (0, 1):
        train_quietly(
            *QUICK,
            "--epochs",
            1,
            "--train-limit",
            128,
            "--seed",
            seed,
            "--data-dir",
            synthetic_data,
            "--out-dir",
            tmp_path / str(seed),
        )
    assert not torch.equal(
        trained_weights(tmp_path / "0")["features.0.weight"], trained_weights(tmp_path / "1")["features.0.weight"]
    )


@pytest.mark.slow
def test_log_lines_every_n_batches(synthetic_data, tmp_path, cli):
    result = cli(*QUICK, "--epochs", 1, "--log-interval", 10, "--data-dir", synthetic_data, "--out-dir", tmp_path)
    assert result.code == 0
    assert "[Epoch 1, Batch 10] loss:" in result.log and "[Epoch 1, Batch 30] loss:" in result.log
    assert "[Epoch 1, Batch 40]" not in result.log  # 1200 / 32 = 38 batches


def test_a_training_step_returns_the_summed_loss_and_right_answers_and_learns():
    model = app.new_model(0, torch.device("cpu"))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    images, labels = torch.randn(8, 1, 28, 28), torch.arange(8)
    with torch.no_grad():
        logits = model(images)
    before = [parameter.detach().clone() for parameter in model.parameters()]
    loss_sum, correct = app.train_step(model, optimizer, schedule, images, labels, loss_divisor=8, label_smoothing=0.1)
    torch.testing.assert_close(loss_sum, F.cross_entropy(logits, labels, reduction="sum", label_smoothing=0.1))
    assert correct == (logits.argmax(1) == labels).sum()
    assert all(not torch.equal(old, new) for old, new in zip(before, model.parameters()))
    assert optimizer.param_groups[0]["lr"] == 5e-4  # the schedule stepped once


# --- resuming ------------------------------------------------------------------------------------

RESUMABLE = (*QUICK_WITH_FIGURES, "--epochs", 3, "--log-interval", 5)  # 38 batches an epoch


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, synthetic_data):
    out_dir = tmp_path_factory.mktemp("uninterrupted")
    train_quietly(*RESUMABLE, "--data-dir", synthetic_data, "--out-dir", out_dir)
    return out_dir


@pytest.fixture(scope="module")
def finished(tmp_path_factory, synthetic_data):
    """The checkpoint of a run as RESUMABLE's, without its figures: what --resume checks before it trains."""
    out_dir = tmp_path_factory.mktemp("finished")
    train_quietly(*RESUMABLE, "--no-figures", "--data-dir", synthetic_data, "--out-dir", out_dir)
    return out_dir


@pytest.mark.slow
def test_resume_from_the_end_of_an_epoch_is_bit_exact(synthetic_data, tmp_path, uninterrupted, cli):
    flags = (*RESUMABLE, "--data-dir", synthetic_data, "--out-dir", tmp_path)
    assert cli(*flags, "--epochs", 1).code == 0
    result = cli(*flags, "--resume")
    assert result.code == 0 and "Resuming from" in result.log and "1 epochs and 0 batches done" in result.log
    assert "Epoch 1/4" not in result.log
    assert_same_run(uninterrupted, tmp_path)


@pytest.mark.slow
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


@pytest.mark.slow
def test_resume_with_other_settings_is_refused_naming_each(synthetic_data, tmp_path, finished, cli):
    shutil.copy(finished / "checkpoint.pt", tmp_path / "checkpoint.pt")
    error = refused_resume(cli, tmp_path, synthetic_data, "--batch-size", 16, "--lr", 0.01, "--seed", 5)
    assert "--batch-size 32 (now 16)" in error and "--lr 0.001 (now 0.01)" in error and "--seed 0 (now 5)" in error


def test_resume_cannot_go_back_in_epochs(synthetic_data, tmp_path, finished, cli):
    shutil.copy(finished / "checkpoint.pt", tmp_path / "checkpoint.pt")
    assert "--epochs 2 cannot go back" in refused_resume(cli, tmp_path, synthetic_data, "--epochs", 2)


def test_resume_from_a_model_file_without_training_state_is_refused(synthetic_data, tmp_path, trained, cli):
    shutil.copy(trained[0] / "lenet5_mnist.pt", tmp_path / "checkpoint.pt")
    assert "no training state" in refused_resume(cli, tmp_path, synthetic_data)


@pytest.mark.parametrize("format", [None, 1, 3])  # None: written before checkpoints had a format number
def test_resume_from_another_versions_checkpoint_is_refused(format, synthetic_data, tmp_path, finished, cli):
    payload = torch.load(finished / "checkpoint.pt", weights_only=True)
    if format is None:
        del payload["format"]
    else:
        payload["format"] = format
    torch.save(payload, tmp_path / "checkpoint.pt")
    error = refused_resume(cli, tmp_path, synthetic_data)
    assert "another version of this program" in error
    assert f"checkpoint format {format or 1}, this version reads {files.CHECKPOINT_FORMAT}" in error


def test_resume_from_a_checkpoint_of_the_renamed_seed_recipe_is_refused(synthetic_data, tmp_path, finished, cli):
    """The original recipe was called `seed` before: such a checkpoint is refused, naming the change."""
    payload = torch.load(finished / "checkpoint.pt", weights_only=True)
    payload["config"]["recipe"] = "seed"
    torch.save(payload, tmp_path / "checkpoint.pt")
    assert "--recipe seed (now original)" in refused_resume(cli, tmp_path, synthetic_data)


def test_resume_without_a_checkpoint_is_refused(synthetic_data, tmp_path, cli):
    error = refused_resume(cli, tmp_path, synthetic_data)
    assert "there is no" in error and "checkpoint.pt" in error


# --- interruptions: these are about the process, so they start one -------------------------------


def signalled_mid_epoch(background, flags, sig):
    """Start a training process that waits after batch 10 of epoch 2, send it `sig` there, then let
    it go on; returns (exit code, log)."""
    job = background(paused_command(2, 10, *flags))
    job.wait_for_line("paused at epoch 2, batch 10")
    job.send(sig)
    if sig != signal.SIGKILL:
        job.go_on()
    return job.finish()


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bit_exact(synthetic_data, tmp_path, background, uninterrupted, cli):
    flags = (*RESUMABLE, "--data-dir", synthetic_data, "--out-dir", tmp_path)
    code, log = signalled_mid_epoch(background, flags, signal.SIGKILL)
    assert code == -signal.SIGKILL, log
    assert (
        torch.load(tmp_path / "checkpoint.pt", weights_only=True)["progress"]["epoch"] == 1
    )  # the last complete epoch
    assert cli(*flags, "--resume").code == 0
    assert_same_run(uninterrupted, tmp_path)


@pytest.mark.slow
def test_sigint_saves_mid_epoch_and_resume_is_bit_exact(synthetic_data, tmp_path, background, uninterrupted, cli):
    flags = (*RESUMABLE, "--data-dir", synthetic_data, "--out-dir", tmp_path)
    code, log = signalled_mid_epoch(background, flags, signal.SIGINT)
    assert code == 130, log
    assert "Traceback" not in log
    assert "Interrupted in epoch 2 after batch 10" in log
    # The hint names this interpreter (the venv's), not a bare `python`; run as printed, it resumes.
    hint = shlex.join([resume.shown_path(sys.executable), resume.shown_path(SCRIPT), *map(str, flags), "--resume"])
    assert f"Continue with: {hint}\n" in log and not hint.startswith("python ")
    progress = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["progress"]
    assert (progress["epoch"], progress["batches_done"]) == (1, 10)  # saved right where the signal landed
    assert not (tmp_path / "metrics.json").exists()
    resumed = run_process(shlex.split(hint))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(uninterrupted, tmp_path)


# --- failures ------------------------------------------------------------------------------------


def test_a_non_finite_loss_stops_with_exit_1_and_keeps_the_last_checkpoint(synthetic_data, tmp_path, finished, cli):
    shutil.copy(finished / "checkpoint.pt", tmp_path / "checkpoint.pt")
    before = (tmp_path / "checkpoint.pt").read_bytes()
    result = cli(*QUICK, "--lr", "1e30", "--log-interval", 5, "--data-dir", synthetic_data, "--out-dir", tmp_path)
    assert result.code == 1
    [error] = result.errors()
    assert "infinite or NaN in epoch 1, batch" in error and "lower --lr (now 1e+30)" in error
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert not (tmp_path / "metrics.json").exists()


def test_a_diverging_loss_is_its_own_exception_not_a_command_line_error():
    progress = app.Progress(
        torch.Generator().get_state(), batch_losses=torch.tensor([1.0, float("inf"), 2.0]), batch_correct=torch.zeros(3)
    )
    args = app.parse_args(["--batch-size", "4"])
    with pytest.raises(app.LossDiverged, match="epoch 1, batch 2"):
        app.batch_stats(progress, 0, 3, 12, args, devices.Runtime(torch.device("cpu")))
    assert not issubclass(app.LossDiverged, app.CliError)
    assert app.batch_stats(progress, 2, 3, 12, args, devices.Runtime(torch.device("cpu"))) == (0.5, 0.0)


def test_an_output_folder_that_cannot_be_written_is_refused_before_training(synthetic_data, tmp_path, cli):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    result = cli(*QUICK, "--data-dir", synthetic_data, "--out-dir", blocker / "out")
    assert result.code == 2 and "Cannot write into the output folder" in result.errors()[0]
    assert "Epoch" not in result.log


# --- recipes: schedules, augmentation ------------------------------------------------------------


def lrs_of(schedule, steps=100, lr=1e-2, warmup=0.25):
    args = app.parse_args(["--schedule", schedule, "--lr", str(lr), "--warmup", str(warmup), "--epochs", "1"])
    optimizer = app.new_optimizer(app.LeNet5(), args)
    scheduler = app.new_schedule(optimizer, args, steps_per_epoch=steps)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_the_constant_schedule_keeps_the_learning_rate():
    assert lrs_of("constant") == [1e-2] * 100


def test_onecycle_warms_up_from_a_25th_to_the_peak_then_anneals_to_almost_nothing():
    rates = lrs_of("onecycle")
    assert rates[0] == pytest.approx(1e-2 / 25)
    assert max(rates) == pytest.approx(1e-2) and rates.index(max(rates)) in (24, 25)
    assert rates[-1] < 1e-6
    assert all(a <= b for a, b in zip(rates[:24], rates[1:25])) and all(a >= b for a, b in zip(rates[25:], rates[26:]))


def test_cosine_warms_up_linearly_from_zero_then_anneals_to_zero():
    rates = lrs_of("cosine", warmup=0.1)
    assert rates[0] == pytest.approx(1e-2 / 10) and rates[4] == pytest.approx(5e-3)
    assert rates[10] == pytest.approx(1e-2)  # the peak, right after the 10 warm-up steps
    assert rates[-1] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))


def test_augmentation_moves_each_image_alone_and_keeps_its_label(synthetic_data):
    images, labels = app.normalised_split(synthetic_data, MNIST_DATA, True, 64, torch.device("cpu"))
    args = app.parse_args(["--augment", "affine"])
    order = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    moved, moved_labels = training_batch((images, labels), order, args, devices.Runtime(torch.device("cpu")), 1, 0)
    assert moved.shape == images.shape and torch.equal(moved_labels, labels[order])
    matrices = kernels.random_affine_matrices(64, app.generator_for(0, 1, 0), MNIST_DATA.augment_limits)
    for position in (0, 17, 63):
        source = order[position]
        alone = kernels.resampled(images[source : source + 1], matrices[position : position + 1])
        torch.testing.assert_close(moved[position : position + 1], alone)
        assert not torch.equal(alone, images[source : source + 1])


@pytest.mark.parametrize(
    "given, kept",
    [
        ("affine", "affine"),
        ("thickness,affine", "affine,thickness"),
        ("elastic, thickness,affine", "affine,elastic,thickness"),
        ("none", "none"),
    ],
)
def test_augment_takes_a_list_in_any_order(given, kept):
    assert app.parse_args(["--augment", given]).augment == kept


@pytest.mark.parametrize("augment", ["affine,elastic", "elastic,thickness", "affine,elastic,thickness"])
def test_every_augmentation_changes_each_image_alone_and_keeps_its_label(augment, synthetic_data):
    """The batch is what the augmentations do to each image on its own, with its own random numbers,
    drawn for the batch in the order affine, elastic, thickness."""
    images, labels = app.normalised_split(synthetic_data, MNIST_DATA, True, 64, torch.device("cpu"))
    order = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    args = app.parse_args(["--augment", augment])
    changed, changed_labels = training_batch((images, labels), order, args, devices.Runtime(torch.device("cpu")), 2, 5)
    assert torch.equal(changed_labels, labels[order])
    generator, names = app.generator_for(0, 2, 5), augment.split(",")
    limits = MNIST_DATA.augment_limits
    matrices = (
        kernels.random_affine_matrices(64, generator, limits) if "affine" in names else torch.eye(2, 3).expand(64, 2, 3)
    )
    fields = kernels.random_displacements(64, generator, limits)
    amounts = kernels.random_thickness(64, generator, limits) if "thickness" in names else torch.zeros(64)
    for position in (0, 17, 63):
        image = images[order[position]].unsqueeze(0)
        alone = kernels.thickened(
            kernels.resampled(image, matrices[position : position + 1], fields[position : position + 1]),
            amounts[position : position + 1],
        )
        torch.testing.assert_close(changed[position : position + 1], alone, rtol=0, atol=1e-5)
        assert not torch.allclose(alone, image, atol=0.05)


def test_clothes_get_no_handwriting_augmentations(synthetic_data):
    """Fashion-MNIST's limits switch elastic and thickness off: with them its batches are, bit for bit,
    those of affine alone, so its best recipe's numbers stay what they were."""
    train_set = app.normalised_split(synthetic_data, MNIST_DATA, True, 32, torch.device("cpu"))
    cpu, order = devices.Runtime(torch.device("cpu")), torch.arange(32)

    def batch(augment):
        args = app.parse_args(["--augment", augment, "--dataset", "fashion-mnist"])
        return training_batch(train_set, order, args, cpu, 1, 3)[0]

    assert torch.equal(batch("affine,elastic,thickness"), batch("affine"))


def test_elastic_fields_are_smooth_and_as_strong_as_alpha_says():
    limits = MNIST_DATA.augment_limits
    fields = kernels.random_displacements(2000, torch.Generator().manual_seed(0), limits) * 14  # in pixels
    assert fields.shape == (2000, 28, 28, 2)
    assert abs(fields.mean()) < 0.01  # no drift
    neighbours = (fields[:, 1:] - fields[:, :-1]).std()
    assert neighbours < 0.2 * fields.std()  # smooth: a pixel moves almost as its neighbour does
    stronger = (
        kernels.random_displacements(
            2000,
            torch.Generator().manual_seed(0),
            {**limits, "elastic_alpha_pixels": 2 * limits["elastic_alpha_pixels"]},
        )
        * 14
    )
    torch.testing.assert_close(stronger, 2 * fields)


def test_thickness_moves_an_image_toward_its_dilation_or_erosion():
    image = torch.full((1, 1, 28, 28), -0.4242)  # MNIST's background, normalised
    image[0, 0, 8:20, 13:15] = 2.8215  # a vertical stroke two pixels wide
    images = image.repeat(5, 1, 1, 1)
    thick = kernels.thickened(images, torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0]))
    inked = (thick > 0).sum(dim=(1, 2, 3)).tolist()
    assert inked == [14 * 4, 14 * 4, 12 * 2, 12 * 2, 0]  # dilated: 4 wide, 14 tall; fully eroded: gone
    assert thick.sum(dim=(1, 2, 3)).diff().lt(0).all()  # less ink at every step from wider to thinner
    torch.testing.assert_close(thick[1], (images[0] + thick[0]) / 2)  # half way is the average
    torch.testing.assert_close(thick[2], images[2])
    amounts = kernels.random_thickness(10_000, torch.Generator().manual_seed(0), MNIST_DATA.augment_limits)
    limit = MNIST_DATA.augment_limits["thickness"]
    assert amounts.abs().max() <= limit and amounts.min() < -0.9 * limit and amounts.max() > 0.9 * limit


def test_affine_matrices_stay_within_their_limits():
    matrices = kernels.random_affine_matrices(10_000, torch.Generator().manual_seed(0), MNIST_DATA.augment_limits)
    shift_limit = 2 / 28 * MNIST_DATA.augment_limits["shift_pixels"]
    assert matrices[:, :, 2].abs().max() <= shift_limit and matrices[:, :, 2].abs().max() > 0.9 * shift_limit
    determinant = torch.linalg.det(matrices[:, :, :2])  # 1 / scale**2: rotation and shear keep the area
    scale = 1 / determinant.sqrt()
    limit = MNIST_DATA.augment_limits["scale"]
    assert scale.min() >= 1 - limit - 1e-6 and scale.max() <= 1 + limit + 1e-6
    images = torch.rand(2, 1, 28, 28)
    identity = kernels.resampled(images, torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]] * 2))
    torch.testing.assert_close(identity, images)


def test_augmentation_is_the_same_for_the_same_seed_epoch_and_batch(synthetic_data):
    train_set = app.normalised_split(synthetic_data, MNIST_DATA, True, 32, torch.device("cpu"))
    cpu, order = devices.Runtime(torch.device("cpu")), torch.arange(32)

    def batch(seed, epoch, index):
        return training_batch(
            train_set, order, app.parse_args(["--augment", "affine", "--seed", str(seed)]), cpu, epoch, index
        )[0]

    assert torch.equal(batch(0, 1, 0), batch(0, 1, 0))
    assert not torch.equal(batch(0, 1, 0), batch(0, 1, 1))
    assert not torch.equal(batch(0, 1, 0), batch(0, 2, 0))
    assert not torch.equal(batch(0, 1, 0), batch(1, 1, 0))


@pytest.mark.slow
def test_each_batch_is_fetched_whole_by_one_indexing_call(synthetic_data, tmp_path, cli, monkeypatch):
    """The training and evaluation DataLoaders hand the Split each batch whole (__getitems__). A
    sampler or fetcher that went image by image, and collated 32 tensors, would call __getitem__."""
    fetched, getitems = [], app.Split.__getitems__

    def one_image(split, index):
        pytest.fail("an image was fetched on its own")

    monkeypatch.setattr(app.Split, "__getitem__", one_image)
    monkeypatch.setattr(
        app.Split, "__getitems__", lambda split, batch: (fetched.append(batch), getitems(split, batch))[1]
    )
    flags = (
        "--epochs",
        1,
        "--train-limit",
        96,
        "--test-limit",
        50,
        "--data-dir",
        synthetic_data,
        "--out-dir",
        tmp_path,
    )
    assert cli(*QUICK, *flags, "--out-dir", tmp_path).code == 0
    training = [batch for batch in fetched if isinstance(batch, app.Batch)]
    assert [(batch.number, len(batch.indices)) for batch in training] == [(0, 32), (1, 32), (2, 32)]
    assert [batch for batch in fetched if not isinstance(batch, app.Batch)] == [slice(0, 1000)]  # evaluation


def test_two_processes_augment_their_shares_as_one_process_augments_the_batch(synthetic_data):
    train_set = app.normalised_split(synthetic_data, MNIST_DATA, True, 40, torch.device("cpu"))
    args, order = app.parse_args(["--augment", "affine,elastic,thickness"]), torch.randperm(40)
    whole, _ = training_batch(train_set, order, args, devices.Runtime(torch.device("cpu")), 3, 7)
    for rank in (0, 1):
        share, _ = training_batch(
            train_set, order, args, devices.Runtime(torch.device("cpu"), rank=rank, world_size=2), 3, 7
        )
        torch.testing.assert_close(share, whole[rank::2], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_augmentation_never_touches_the_evaluation_images(synthetic_data, tmp_path, cli):
    """The accuracy measured at the end of augmented training is what evaluate, which has no
    augmentation, measures again on the same images."""
    flags = (*QUICK, "--epochs", 1, "--augment", "affine", "--data-dir", synthetic_data)
    assert cli(*flags, "--out-dir", tmp_path).code == 0
    recorded = json.loads((tmp_path / "metrics.json").read_text())["eval_accuracy"]
    result = cli(
        "evaluate",
        "--checkpoint",
        tmp_path / "lenet5_mnist.pt",
        "--data-dir",
        synthetic_data,
        "--no-download",
        "--device",
        "cpu",
        "--out-dir",
        tmp_path / "evaluated",
    )
    assert f"test images: {recorded:.3f} %" in result.log


@pytest.mark.slow
def test_resume_mid_epoch_with_augmentation_and_a_schedule_is_bit_exact(synthetic_data, tmp_path, monkeypatch, cli):
    flags = (
        *QUICK_WITH_FIGURES,
        "--epochs",
        3,
        "--augment",
        "affine,elastic,thickness",
        "--schedule",
        "onecycle",
        "--lr",
        "0.005",
        "--label-smoothing",
        "0.1",
        "--adam-betas",
        "0.8,0.99",
        "--data-dir",
        synthetic_data,
    )
    assert cli(*flags, "--out-dir", tmp_path / "whole").code == 0
    interrupt_at(monkeypatch, epoch=2, batch=11)
    stopped = cli(*flags, "--out-dir", tmp_path / "resumed")
    assert stopped.code == 130 and "Interrupted in epoch 2 after batch 11" in stopped.log
    monkeypatch.undo()
    assert cli(*flags, "--out-dir", tmp_path / "resumed", "--resume").code == 0
    assert_same_run(tmp_path / "whole", tmp_path / "resumed")


@pytest.mark.slow
def test_resume_with_a_schedule_cannot_change_the_epochs(synthetic_data, tmp_path, cli):
    flags = (*QUICK, "--epochs", 1, "--schedule", "cosine", "--data-dir", synthetic_data, "--out-dir", tmp_path)
    assert cli(*flags).code == 0
    result = cli(*flags, "--epochs", 2, "--resume")
    assert result.code == 2 and "--epochs 1 (now 2)" in result.errors()[0]


@pytest.mark.slow
def test_validation_holds_out_the_last_training_images(synthetic_data, tmp_path, cli):
    result = cli(
        *QUICK_WITH_FIGURES, "--epochs", 1, "--validation", 200, "--data-dir", synthetic_data, "--out-dir", tmp_path
    )
    assert result.code == 0
    assert "1000 training and 200 validation images of MNIST" in result.log
    assert "validation loss" in result.log and "test loss" not in result.log
    assert "Accuracy of the network on the 200 validation images" in result.log
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["eval_split"], metrics["eval_images"]) == ("validation", 200)
    assert torch.load(tmp_path / "lenet5_mnist.pt", weights_only=True)["eval_split"] == "validation"
    # No figure or page of the run says "test", nor shows test images.
    assert (tmp_path / "validation_images.png").is_file() and not (tmp_path / "test_images.png").exists()
    page = (tmp_path / "report.html").read_text()
    assert "validation accuracy</title>" in page and "<th>validation loss</th>" in page
    assert 'alt="validation_images.png"' in page and " test " not in re.sub(r"<img [^>]*>", "", page)
    train_set, held_out = app.load_data(
        app.parse_args(["--validation", "200", "--data-dir", str(synthetic_data), "--device", "cpu"]),
        devices.Runtime(torch.device("cpu")),
    )
    everything = app.normalised_split(synthetic_data, MNIST_DATA, True, None, torch.device("cpu"))
    assert torch.equal(held_out[0], everything[0][-200:]) and torch.equal(train_set[1], everything[1][:-200])


def test_validation_larger_than_the_training_set_is_refused(synthetic_data, tmp_path, cli):
    result = cli(*QUICK, "--validation", 5000, "--data-dir", synthetic_data, "--out-dir", tmp_path)
    assert result.code == 2 and "only 1200 images" in result.errors()[0]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", PROMISED_RECIPES)
def test_every_recipe_learns_the_synthetic_data_far_above_chance(recipe, synthetic_data, tmp_path, cli):
    # The recipes' batches are sized for 60,000 images; on 1,200 they would make only a few steps.
    # Two epochs each: the recipes' own epochs are pinned in test_settings.py.
    result = cli(
        "--recipe",
        recipe,
        "--epochs",
        2,
        "--batch-size",
        32,
        "--no-download",
        "--device",
        "cpu",
        "--data-dir",
        synthetic_data,
        "--out-dir",
        tmp_path,
    )
    assert result.code == 0 and f"Recipe {recipe}:" in result.log
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["recipe"] == recipe and metrics["config"]["batch_size"] == 32
    promised = {name: value for name, value in PROMISED_RECIPES[recipe].items() if name not in ("epochs", "batch_size")}
    assert {name: metrics["config"][name] for name in promised} == promised
    assert metrics["eval_accuracy"] > 60  # chance is 10 %


# --- evaluation during training ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("every, evaluated", [(0, [3]), (2, [2, 3]), (1, [1, 2, 3])])
def test_eval_every_n_epochs_and_always_after_the_last(every, evaluated, synthetic_data, tmp_path, cli):
    result = cli(*QUICK, "--epochs", 3, "--eval-every", every, "--data-dir", synthetic_data, "--out-dir", tmp_path)
    assert result.code == 0
    epochs = json.loads((tmp_path / "metrics.json").read_text())["epochs"]
    assert [epoch["epoch"] for epoch in epochs if epoch["eval_accuracy"] is not None] == evaluated
    assert result.log.count("test accuracy") == len(evaluated)


def test_mirror_images_only_for_datasets_whose_classes_survive_them():
    for dataset in app.DATASETS.values():
        matrices = kernels.random_affine_matrices(1000, torch.Generator().manual_seed(0), dataset.augment_limits)
        mirrored = (torch.linalg.det(matrices[:, :, :2]) < 0).float().mean().item()
        assert (0.4 < mirrored < 0.6) if dataset.augment_limits["mirror"] else mirrored == 0
    assert app.DATASETS["fashion-mnist"].augment_limits["mirror"] and not app.DATASETS["mnist"].augment_limits["mirror"]


# --- CUDA: only where there is a GPU -------------------------------------------------------------


@pytest.fixture
def cuda_settings_restored():
    """The CUDA runs switch on deterministic algorithms for the whole process: switch them back."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    flags = (
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    yield
    torch.use_deterministic_algorithms(deterministic)
    (
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    ) = flags


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
@pytest.mark.usefixtures("cuda_settings_restored")
def test_on_a_gpu_two_runs_agree_and_resume_is_bit_exact(synthetic_data, tmp_path, monkeypatch, cli):
    flags = (
        "--epochs",
        2,
        "--batch-size",
        32,
        "--no-download",
        "--device",
        "cuda",
        "--augment",
        "affine",
        "--schedule",
        "onecycle",
        "--data-dir",
        synthetic_data,
    )
    for name in ("first", "second"):
        assert cli(*flags, "--out-dir", tmp_path / name).code == 0
    assert_same_run(tmp_path / "first", tmp_path / "second")
    interrupt_at(monkeypatch, epoch=2, batch=7)
    assert cli(*flags, "--out-dir", tmp_path / "resumed").code == 130
    monkeypatch.undo()
    assert cli(*flags, "--out-dir", tmp_path / "resumed", "--resume").code == 0
    assert_same_run(tmp_path / "first", tmp_path / "resumed")
    precision = json.loads((tmp_path / "first" / "metrics.json").read_text())["precision"]
    assert precision["tf32_matmul"] is False and precision["cudnn_deterministic"] is True and precision["gpu"]


# --- the optimiser: torch's Adam without torch._dynamo -----------------------------------------------

ONE_OF_EACH = """
import io, sys
sys.path.insert(0, {repo!r})
import mnist_recognition as app
from companions.using import serve
data, out = {data!r}, {out!r}
def check(command):
    if "torch._dynamo" in sys.modules:
        sys.exit(f"torch._dynamo was imported by {{command}}: torch now reaches it on a path that the "
                 "commands take (see Adam in mnist_recognition.py, and torch.optim's _disable_dynamo hooks)")
check("importing the script")
assert app.main(["--epochs", "1", "--train-limit", "256", "--test-limit", "64", "--batch-size", "32",
                 "--recipe", "fast", "--no-download", "--device", "cpu", "--data-dir", data, "--out-dir", out]) == 0
check("training")
assert app.main(["evaluate", "--checkpoint", out + "/lenet5_mnist.pt", "--data-dir", data, "--test-limit", "64",
                 "--no-download", "--device", "cpu", "--out-dir", out + "/evaluated"]) == 0
check("evaluate")
assert app.main(["predict", out + "/train_images.png", "--checkpoint", out + "/lenet5_mnist.pt",
                 "--layers", out + "/inside.png"]) == 0
check("predict")
args = app.parse_args(["serve", "--checkpoint", out + "/lenet5_mnist.pt", "--port", "0"])
server = serve.start_server(args)
server.prediction_for(open(out + "/train_images.png", "rb").read(), with_layers=True)
server.server_close()
check("serve")
print("none")
"""


@pytest.mark.slow
def test_no_command_but_export_imports_torch_dynamo(synthetic_data, tmp_path):
    """torch.optim's Optimizer imports torch._dynamo (seconds) for torch.compile's sake; training,
    evaluate, predict and serve never compile, so none of them may import it."""
    probe = ONE_OF_EACH.format(repo=str(SCRIPT.parent), data=str(synthetic_data), out=str(tmp_path / "out"))
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.splitlines()[-1] == "none", result.stderr[-3000:]


@pytest.mark.parametrize("recipe", ["original", "fast", "best"])
def test_adam_steps_as_torch_optim_adam_does_with_the_same_state(recipe):
    """Bit for bit: the weights, the state and its layout after steps under each recipe's schedule,
    and a run continued from torch.optim.Adam's own state_dict."""
    args = app.parse_args(["--recipe", recipe, "--device", "cpu"])
    images = torch.randn(32, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    labels = torch.arange(32) % 10

    def run(optimizer_class, steps, model=None, state=None):
        model = model or app.new_model(0, torch.device("cpu"))
        if optimizer_class is app.Adam:
            optimizer = app.Adam(model.parameters(), lr=args.lr, betas=args.adam_betas)
        else:
            optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=args.adam_betas, fused=True)
        schedule = app.new_schedule(optimizer, args, steps_per_epoch=16)
        if state:
            optimizer.load_state_dict(state[0])
            schedule.load_state_dict(state[1])
        for _ in range(steps):
            app.train_step(model, optimizer, schedule, images, labels, len(labels), args.label_smoothing)
        return model, optimizer, schedule

    ours, theirs = run(app.Adam, 6), run(torch.optim.Adam, 6)
    for mine, reference in zip(ours[0].state_dict().values(), theirs[0].state_dict().values()):
        assert torch.equal(mine, reference)
    mine, reference = ours[1].state_dict(), theirs[1].state_dict()
    assert mine["param_groups"] == reference["param_groups"]
    assert list(mine["param_groups"][0]) == list(reference["param_groups"][0])  # the same keys in the same order
    assert mine["state"].keys() == reference["state"].keys()
    for index, state in reference["state"].items():
        assert state.keys() == mine["state"][index].keys()
        for key, tensor in state.items():
            assert torch.equal(mine["state"][index][key], tensor) and mine["state"][index][key].dtype == tensor.dtype
            assert mine["state"][index][key].stride() == tensor.stride()
    assert ours[2].state_dict() == theirs[2].state_dict()
    # A checkpoint written by torch.optim.Adam continues exactly under this Adam.
    continued = run(app.Adam, 3, copy.deepcopy(theirs[0]), (copy.deepcopy(reference), theirs[2].state_dict()))
    further = run(torch.optim.Adam, 3, copy.deepcopy(theirs[0]), (copy.deepcopy(reference), theirs[2].state_dict()))
    for mine, reference in zip(continued[0].state_dict().values(), further[0].state_dict().values()):
        assert torch.equal(mine, reference)


# --- bad input: one line, exit code 2, nothing left behind -------------------------------------------


@pytest.mark.parametrize("refusal, reason", [("read_only", "Permission denied"), ("full", "No space left on device")])
def test_an_output_folder_that_takes_no_file_is_one_line(refusal, reason, synthetic_data, tmp_path, cli, refusing):
    (tmp_path / "out").mkdir()
    getattr(refusing, refusal)(tmp_path / "out")
    result = cli(*QUICK, "--epochs", 1, "--data-dir", synthetic_data, "--out-dir", tmp_path / "out")
    assert result.code == 2 and len(result.errors()) == 1 and "Traceback" not in result.log
    assert f"Cannot write into the output folder {tmp_path / 'out'}: {reason}" in result.errors()[0]
    assert list((tmp_path / "out").iterdir()) == []


def test_a_disk_that_fills_up_while_writing_the_model_is_one_line(synthetic_data, tmp_path, cli, monkeypatch):
    out_dir = tmp_path / "out"
    real_fsync = os.fsync

    def full_once_the_checkpoint_is_written(descriptor):
        if (out_dir / "checkpoint.pt").exists():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", full_once_the_checkpoint_is_written)
    result = cli(*QUICK, "--epochs", 1, "--data-dir", synthetic_data, "--out-dir", out_dir)
    assert result.code == 2 and len(result.errors()) == 1 and "Traceback" not in result.log
    assert f"Cannot write {out_dir / 'lenet5_mnist.pt'}: No space left on device." in result.errors()[0]
    assert sorted(path.name for path in out_dir.iterdir()) == ["checkpoint.pt"]  # no half file, no temporary


def test_the_process_exits_as_python_does_for_each_kind_of_exit_code(capsys):
    assert [app.exit_status(code) for code in (None, 0, 2, 130)] == [0, 0, 2, 130]
    assert app.exit_status("a message") == 1 and capsys.readouterr().err == "a message\n"
