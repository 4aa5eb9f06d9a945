"""Data: offline use, clear errors for missing or damaged files, and the user's files left alone."""
import gzip
import hashlib
import json
import os
import shutil
import struct

import pytest
import torch

import mnist_recognition as app
from conftest import REPO, TEST_COUNT, TRAIN_COUNT, run_cli

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def fingerprint(folder):
    return {path.name: hashlib.md5(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


@pytest.fixture
def data_copy(tmp_path, synthetic_data):
    copy = tmp_path / "data"
    shutil.copytree(synthetic_data, copy)
    return copy


def test_load_split_normalises_like_totensor_then_normalize(synthetic_data):
    from torchvision import datasets, transforms
    images, labels = app.load_split(synthetic_data, True, None, torch.device("cpu"))
    assert images.shape == (TRAIN_COUNT, 1, 28, 28) and labels.shape == (TRAIN_COUNT,)
    reference = datasets.MNIST(str(synthetic_data), train=True, transform=transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))]))
    for index in (0, 17, TRAIN_COUNT - 1):
        image, label = reference[index]
        torch.testing.assert_close(images[index], image, rtol=0, atol=1e-6)
        assert labels[index] == label


def test_limits_take_the_first_samples(synthetic_data):
    images, labels = app.load_split(synthetic_data, False, 50, torch.device("cpu"))
    full_images, full_labels = app.load_split(synthetic_data, False, None, torch.device("cpu"))
    assert len(labels) == 50 and torch.equal(images, full_images[:50]) and torch.equal(labels, full_labels[:50])
    assert len(full_labels) == TEST_COUNT


@pytest.mark.parametrize("download_flag", [["--no-download"], []])
def test_missing_files_exit_2_with_a_message_naming_the_files(tmp_path, download_flag):
    # The proxy on a closed local port makes any download attempt fail at once, network or not.
    env = dict(os.environ, http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
               HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")
    result = run_cli(*download_flag, "--data-dir", tmp_path / "data", "--out-dir", tmp_path / "out", env=env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    for name in FILES:
        assert f"{name}.gz" in result.stderr
    assert str(tmp_path / "data" / "MNIST" / "raw") in result.stderr
    assert ("--no-download" if download_flag else "download failed") in result.stderr


def test_a_gz_with_the_wrong_md5_is_reported_and_left_alone(data_copy, tmp_path):
    raw = data_copy / "MNIST" / "raw"
    with gzip.open(raw / "train-images-idx3-ubyte.gz", "wb") as archive:
        archive.write((raw / "train-images-idx3-ubyte").read_bytes()[:5000])  # truncated, and not official
    (raw / "train-images-idx3-ubyte").unlink()
    before = fingerprint(raw)
    result = run_cli("--no-download", "--data-dir", data_copy, "--out-dir", tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "train-images-idx3-ubyte.gz" in result.stderr and "MD5" in result.stderr
    assert fingerprint(raw) == before


def damage_magic(raw):
    path = raw / "train-images-idx3-ubyte"
    data = bytearray(path.read_bytes())
    data[:4] = struct.pack(">I", 0x1234)
    path.write_bytes(bytes(data))
    return "train-images-idx3-ubyte", "magic number"


def damage_image_size(raw):
    path = raw / "t10k-images-idx3-ubyte"
    data = bytearray(path.read_bytes())
    data[8:16] = struct.pack(">II", 32, 32)
    path.write_bytes(bytes(data))
    return "t10k-images-idx3-ubyte", "32x32"


def damage_truncate(raw):
    path = raw / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-1000])
    return "train-images-idx3-ubyte", "truncated"


def damage_label_count(raw):
    path = raw / "t10k-labels-idx1-ubyte"
    data = path.read_bytes()
    count = struct.unpack(">I", data[4:8])[0] - 10
    path.write_bytes(data[:4] + struct.pack(">I", count) + data[8:8 + count])
    return "t10k-labels-idx1-ubyte", "labels for the"


def damage_empty(raw):
    (raw / "train-labels-idx1-ubyte").write_bytes(b"")
    return "train-labels-idx1-ubyte", "too short"


@pytest.mark.parametrize("damage", [damage_magic, damage_image_size, damage_truncate, damage_label_count,
                                    damage_empty])
def test_damaged_files_are_named_and_left_as_they_were(data_copy, tmp_path, damage):
    raw = data_copy / "MNIST" / "raw"
    file_name, what = damage(raw)
    before = fingerprint(raw)
    result = run_cli("--no-download", "--data-dir", data_copy, "--out-dir", tmp_path / "out")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert file_name in result.stderr and what in result.stderr
    assert fingerprint(raw) == before


def test_a_data_dir_that_is_a_file_is_refused(tmp_path):
    not_a_folder = tmp_path / "data"
    not_a_folder.write_text("not a folder")
    result = run_cli("--data-dir", not_a_folder, "--out-dir", tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "is not a folder" in result.stderr


def real_mnist_folder():
    """A folder holding the four real MNIST files (extracted or .gz), or None."""
    for folder in (REPO / "data" / "MNIST" / "raw", REPO.parent / "shared" / "mnist"):
        if all((folder / name).is_file() or (folder / f"{name}.gz").is_file() for name in FILES):
            return folder
    return None


@pytest.mark.skipif(real_mnist_folder() is None,
                    reason="real MNIST not found in data/MNIST/raw/ or ../shared/mnist/; "
                           "this 1-epoch accuracy check needs it")
def test_one_epoch_on_real_mnist_reaches_97_5_percent(tmp_path):
    raw = tmp_path / "data" / "MNIST" / "raw"
    shutil.copytree(real_mnist_folder(), raw)
    result = run_cli("--epochs", 1, "--no-download", "--data-dir", tmp_path / "data", "--out-dir", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["test_images"] == 10_000
    assert metrics["test_accuracy"] >= 97.5
    assert "Accuracy of the network on the 10000 test images" in result.stderr
