"""Processes: torchrun with two CPU processes makes the steps of one process, and a dead worker
ends the job. torchrun is what these test, so they start real processes."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import assert_same_weights, run_process, torchrun_command, train_quietly

import mnist_recognition as app
from companions.reports import report
from companions.training import devices

# Ten steps of a global batch of 63: shares of 32 and 31, so the uneven split is tested too.
TEN_STEPS = (
    "--epochs",
    1,
    "--train-limit",
    630,
    "--batch-size",
    63,
    "--no-download",
    "--device",
    "cpu",
    "--no-figures",
)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, synthetic_data):
    """One torchrun job of two processes: (out_dir, CompletedProcess)."""
    out_dir = tmp_path_factory.mktemp("two")
    result = run_process(torchrun_command(*TEN_STEPS, "--data-dir", synthetic_data, "--out-dir", out_dir))
    assert result.returncode == 0, result.stderr
    return out_dir, result


@pytest.mark.slow
def test_two_processes_make_the_steps_of_one(two_processes, synthetic_data, tmp_path):
    two, result = two_processes
    train_quietly(*TEN_STEPS, "--data-dir", synthetic_data, "--out-dir", tmp_path)
    assert sorted(path.name for path in two.iterdir()) == sorted(path.name for path in tmp_path.iterdir())
    assert result.stderr.count("Accuracy of the network") == 1  # only rank 0 logs
    assert "x 2 processes (gloo)" in result.stderr
    metrics_two = json.loads((two / "metrics.json").read_text())
    metrics_one = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics_two["world_size"] == 2 and metrics_two["backend"] == "gloo"
    assert metrics_one["world_size"] == 1
    assert metrics_two["eval_accuracy"] == metrics_one["eval_accuracy"]
    assert metrics_two["epochs"][0]["loss"] == pytest.approx(metrics_one["epochs"][0]["loss"], rel=1e-5)
    # Two processes add the gradients in another order: equal up to float rounding, not bit for bit.
    assert_same_weights(two, tmp_path, atol=1e-5)


@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_in_one_process(two_processes, synthetic_data, tmp_path, cli):
    for name in ("checkpoint.pt", "lenet5_mnist.pt"):
        (tmp_path / name).write_bytes((two_processes[0] / name).read_bytes())
    result = cli(*TEN_STEPS, "--epochs", 2, "--data-dir", synthetic_data, "--out-dir", tmp_path, "--resume")
    assert result.code == 0 and "Resuming from" in result.log
    assert "made on cpu x 2 process(es) on cpu x 1: it continues correctly, but no longer bit-exactly" in result.log
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [epoch["epoch"] for epoch in metrics["epochs"]] == [1, 2] and metrics["world_size"] == 1


def workers_by_rank(out_dir):
    """{rank: pid} of the training processes that write into `out_dir` (a folder of this test's own).

    Found by their command line and the RANK that torchrun gives each, not by parentage or process
    group: torchrun may start helpers of its own, and starts each worker in a session of its own."""
    workers = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(out_dir) in (entry / "cmdline").read_bytes().decode(errors="replace"):
                environment = dict(
                    item.split("=", 1)
                    for item in (entry / "environ").read_bytes().decode(errors="replace").split("\0")
                    if "=" in item
                )
                if "RANK" in environment:
                    workers[int(environment["RANK"])] = int(entry.name)
        except OSError:
            continue  # the process ended meanwhile
    return workers


def is_running(pid):
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


@pytest.mark.slow
def test_a_dead_worker_ends_the_job_with_an_error(synthetic_data, tmp_path, background):
    job = background(
        torchrun_command(
            "--epochs",
            50,
            "--batch-size",
            16,
            "--log-interval",
            20,
            "--no-download",
            "--device",
            "cpu",
            "--data-dir",
            synthetic_data,
            "--out-dir",
            tmp_path,
        )
    )
    job.wait_for_line("[Epoch 2, Batch 20]")  # after the first checkpoint
    workers = workers_by_rank(tmp_path)
    assert sorted(workers) == [0, 1], workers
    os.kill(workers[1], signal.SIGKILL)
    # 50 epochs would take many minutes: ending within this deadline means torchrun stopped the job.
    code, log = job.finish(timeout=120)
    assert code != 0
    assert "Signal 9 (SIGKILL)" in log or "exitcode  : -9" in log, log
    assert "Accuracy of the network" not in log  # the job did not run on to its end
    assert not is_running(workers[0])  # the surviving worker was stopped too
    # The last complete checkpoint is still there and loads.
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["progress"]["epoch"] >= 1


def test_more_processes_than_gpus_is_refused_saying_what_to_run(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(app.CliError, match=r"this machine has 1 GPU\(s\).*--nproc_per_node=1.*--device cpu"):
        devices.pick_device("cuda", local_rank=1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(app.CliError, match="has 0 GPU"):
        devices.pick_device("cuda")


def test_the_cpu_needs_no_gpu_settings():
    assert devices.pick_device("cpu", local_rank=3) == torch.device("cpu")
    assert report.precision_settings(torch.device("cpu")) == {"dtype": "float32"}
