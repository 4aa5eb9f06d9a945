"""Scale-out: torchrun with two CPU processes matches one process, and a dead worker ends the job."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from conftest import SCRIPT, run_cli, trained_weights

# 640 samples at a global batch of 64: ten optimisation steps.
TEN_STEPS = ("--epochs", 1, "--train-limit", 640, "--batch-size", 64, "--no-download")


def torchrun(*args, processes=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            str(SCRIPT), *map(str, args)]


def assert_same_weights_within_1e_5(first_out_dir, second_out_dir):
    first, second = trained_weights(first_out_dir), trained_weights(second_out_dir)
    assert first.keys() == second.keys()
    for name, tensor in second.items():
        torch.testing.assert_close(first[name], tensor, rtol=0, atol=1e-5)


def test_two_processes_match_one_process(synthetic_data, tmp_path):
    two = subprocess.run(torchrun(*TEN_STEPS, "--data-dir", synthetic_data, "--out-dir", tmp_path / "two"),
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    one = run_cli(*TEN_STEPS, "--data-dir", synthetic_data, "--out-dir", tmp_path / "one")
    assert one.returncode == 0, one.stderr

    assert sorted(path.name for path in (tmp_path / "two").iterdir()) == sorted(
        path.name for path in (tmp_path / "one").iterdir())
    assert two.stderr.count("Accuracy of the network") == 1  # only rank 0 logs
    metrics_two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    metrics_one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert metrics_two["world_size"] == 2 and metrics_two["backend"] == "gloo"
    assert metrics_one["world_size"] == 1
    assert metrics_two["test_accuracy"] == metrics_one["test_accuracy"]
    assert_same_weights_within_1e_5(tmp_path / "two", tmp_path / "one")


def test_an_uneven_global_batch_is_split_exactly(synthetic_data, tmp_path):
    """Batch 63 over two processes: shares of 32 and 31, still the single-process steps."""
    flags = ("--epochs", 1, "--train-limit", 630, "--batch-size", 63, "--no-download", "--data-dir", synthetic_data)
    two = subprocess.run(torchrun(*flags, "--out-dir", tmp_path / "two"), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    one = run_cli(*flags, "--out-dir", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    assert_same_weights_within_1e_5(tmp_path / "two", tmp_path / "one")


def worker_pids(launcher_pid):
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    return [int(pid) for pid in children]


def test_a_dead_worker_ends_the_job_with_an_error(synthetic_data, tmp_path, background):
    job = background(command=torchrun("--epochs", 50, "--batch-size", 16, "--log-interval", 20, "--no-download",
                                      "--data-dir", synthetic_data, "--out-dir", tmp_path))
    job.wait_for_line("[Epoch 1, Batch 20]")
    workers = worker_pids(job.process.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    started = time.monotonic()
    code, log = job.finish(timeout=90)
    assert code != 0
    assert time.monotonic() - started < 90
    assert not (tmp_path / "metrics.json").exists()


def test_resume_with_another_number_of_processes(synthetic_data, tmp_path):
    flags = ("--train-limit", 640, "--no-download", "--data-dir", synthetic_data)
    first = subprocess.run(torchrun("--epochs", 1, *flags, "--out-dir", tmp_path), capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr
    resumed = run_cli("--epochs", 2, *flags, "--out-dir", tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming from" in resumed.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [epoch["epoch"] for epoch in metrics["epochs"]] == [1, 2] and metrics["world_size"] == 1
