"""companions/doubt/kept_detector.py: the "not a digit" detector, learned once per dataset and kept beside its files."""

import json
import random
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import QUICK, REPO, draw_digit, write_synthetic_mnist
from loguru import logger
from PIL import Image, ImageDraw

import mnist_recognition as app
from companions.doubt import detector, kept_detector

MNIST_DATA = app.DATASETS["mnist"]
CPU = torch.device("cpu")


@pytest.fixture
def data_dir(tmp_path, synthetic_data):
    """A copy of the synthetic MNIST of this test alone, without a kept detector."""
    copy = tmp_path / "data"
    shutil.copytree(synthetic_data / "MNIST" / "raw", copy / "MNIST" / "raw")
    return copy


@pytest.fixture
def learnings(monkeypatch):
    """How many detectors were learned in this test; each learned in one step from one family, since
    these tests are about keeping it (test_detector.py is about learning it)."""
    count = []
    train = kept_detector.train_detector

    def counted(images, labels, dataset):
        count.append(1)
        return train(images, labels, dataset, families=["blobs"], steps=1)

    monkeypatch.setattr(kept_detector, "train_detector", counted)
    return count


@pytest.fixture
def warnings():
    """The warnings logged in this test."""
    said = []
    sink = logger.add(lambda message: said.append(str(message)), level="WARNING", format="{message}")
    yield said
    logger.remove(sink)


def same_detector(first, second):
    (net_a, above_a), (net_b, above_b) = first, second
    weights_b = net_b.state_dict()
    return above_a == above_b and all(
        torch.equal(tensor, weights_b[name]) for name, tensor in net_a.state_dict().items()
    )


def test_the_first_call_learns_and_keeps_it_and_later_ones_load_it(data_dir, learnings):
    first = kept_detector.detector_for(data_dir, MNIST_DATA, CPU)
    path = kept_detector.kept_path(data_dir, MNIST_DATA)
    assert path.parent == data_dir / "MNIST" and path.is_file()
    again = kept_detector.detector_for(data_dir, MNIST_DATA, CPU)
    assert len(learnings) == 1 and same_detector(first, again)
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []  # written atomically


@pytest.mark.parametrize(
    "spoil",
    [
        lambda path, payload: path.write_bytes(b"not a torch file"),
        lambda path, payload: torch.save({**payload, "dataset": "fashion-mnist"}, path),
        lambda path, payload: torch.save({**payload, "training_files": "0" * 32}, path),
        lambda path, payload: torch.save({**payload, "detector": {"layers.0.weight": torch.zeros(1)}}, path),
        lambda path, payload: torch.save({"model": {}}, path),
    ],
    ids=["damaged", "another dataset", "other training files", "weights that do not fit", "foreign"],
)
@pytest.mark.slow
def test_a_kept_file_that_is_not_this_datasets_detector_is_refused_in_one_line_and_learned_again(
    data_dir, learnings, warnings, spoil
):
    kept_detector.detector_for(data_dir, MNIST_DATA, CPU)
    path = kept_detector.kept_path(data_dir, MNIST_DATA)
    spoil(path, torch.load(path, weights_only=True))
    kept_detector.detector_for(data_dir, MNIST_DATA, CPU)
    assert len(learnings) == 2
    assert len(warnings) == 1 and "refused" in warnings[0] and "\n" not in warnings[0].strip()
    kept_detector.detector_for(data_dir, MNIST_DATA, CPU)  # the one learned again is kept
    assert len(learnings) == 2


@pytest.mark.slow
def test_changing_the_dataset_files_or_the_recipe_learns_a_new_one(data_dir, learnings, monkeypatch):
    kept_detector.detector_for(data_dir, MNIST_DATA, CPU)
    write_synthetic_mnist(data_dir, seed=1)  # other training images in the same folder
    kept_detector.detector_for(data_dir, MNIST_DATA, CPU)
    assert len(learnings) == 2
    first_path = kept_detector.kept_path(data_dir, MNIST_DATA)
    monkeypatch.setitem(detector.RECIPE, "lr", 1e-3)
    assert kept_detector.kept_path(data_dir, MNIST_DATA) != first_path
    kept_detector.detector_for(data_dir, MNIST_DATA, CPU)
    assert len(learnings) == 3 and first_path.is_file()


def test_a_read_only_data_folder_gets_a_detector_for_the_run_alone(data_dir, learnings, warnings, refusing):
    refusing.read_only(data_dir / "MNIST")
    found, above = kept_detector.detector_for(data_dir, MNIST_DATA, CPU)
    assert isinstance(found, detector.Detector) and above == above  # a number
    assert len(learnings) == 1 and "for this run alone" in warnings[-1]
    assert not kept_detector.kept_path(data_dir, MNIST_DATA).exists()


@pytest.mark.slow
def test_training_runs_share_the_datasets_detector_and_each_model_file_carries_a_copy(data_dir, tmp_path, cli):
    first = cli(*QUICK, "--data-dir", data_dir, "--out-dir", tmp_path / "first")
    second = cli(*QUICK, "--seed", 1, "--data-dir", data_dir, "--out-dir", tmp_path / "second")
    assert first.code == second.code == 0
    assert "once" in first.log and "Learning the 'not a digit' detector" not in second.log
    kept = torch.load(kept_detector.kept_path(data_dir, MNIST_DATA), weights_only=True)
    for run in ("first", "second"):
        doubt = torch.load(tmp_path / run / app.MODEL_FILE, weights_only=True)["doubt"]
        assert doubt["not_a_digit_above"] == kept["not_a_digit_above"]
        assert all(torch.equal(doubt["detector"][name], tensor) for name, tensor in kept["detector"].items())
    # A model file stands alone: without the kept detector, predict's answers are the same.
    draw_digit(3, random.Random(0)).save(tmp_path / "three.png")
    zigzag = Image.new("L", (200, 200), 255)
    ImageDraw.Draw(zigzag).line([(20, 40), (180, 60), (20, 100), (180, 120), (20, 160)], fill=0, width=12)
    zigzag.save(tmp_path / "zigzag.png")
    predict = ("predict", tmp_path / "three.png", tmp_path / "zigzag.png", "--json", "--device", "cpu")
    before = cli(*predict, "--checkpoint", tmp_path / "first" / app.MODEL_FILE)
    kept_detector.kept_path(data_dir, MNIST_DATA).unlink()
    after = cli(*predict, "--checkpoint", tmp_path / "first" / app.MODEL_FILE)
    assert before.code == after.code == 0 and before.stdout == after.stdout
    assert all("verdict" in answer for answer in json.loads(after.stdout))


LEARN_IN_A_PROCESS = """
import sys, torch
import mnist_recognition as app
from companions.doubt import kept_detector
torch.set_num_threads(1)
network, above = kept_detector.detector_for(sys.argv[1], app.DATASETS["mnist"], torch.device("cpu"))
torch.save({"weights": network.state_dict(), "above": above}, sys.argv[2])
"""


@pytest.mark.slow
def test_two_processes_that_need_it_at_once_both_get_the_same_one_learned_once(data_dir, tmp_path):
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", LEARN_IN_A_PROCESS, str(data_dir), str(tmp_path / f"got-{n}.pt")],
            cwd=REPO,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(2)
    ]
    logs = [process.communicate(timeout=240)[1] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], logs
    assert sum("Learning the 'not a digit' detector" in log for log in logs) == 1
    got = [torch.load(tmp_path / f"got-{n}.pt", weights_only=True) for n in range(2)]
    assert got[0]["above"] == got[1]["above"]
    assert all(torch.equal(tensor, got[1]["weights"][name]) for name, tensor in got[0]["weights"].items())
