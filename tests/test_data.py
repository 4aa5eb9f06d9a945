"""Data: offline use, clear errors for missing or damaged files, and the user's files left alone."""
import gzip
import hashlib
import json
import shutil
import struct

import pytest
import torch
from torchvision.datasets import MNIST

import mnist_recognition as app
from conftest import REPO, TEST_COUNT, TRAIN_COUNT

# Written out here rather than taken from the script, so that a wrong name there cannot hide.
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
NO_DOWNLOAD = ("--no-download", "--device", "cpu")
MNIST_DATA = app.DATASETS["mnist"]


def fingerprint(folder):
    return {path.name: hashlib.md5(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


@pytest.fixture
def data_copy(tmp_path, synthetic_data):
    copy = tmp_path / "data"
    shutil.copytree(synthetic_data, copy)
    return copy


def test_load_split_normalises_like_totensor_then_normalize(synthetic_data):
    from torchvision import datasets, transforms
    images, labels = app.load_split(synthetic_data, MNIST_DATA, True, None, torch.device("cpu"))
    assert images.shape == (TRAIN_COUNT, 1, 28, 28) and labels.shape == (TRAIN_COUNT,)
    reference = datasets.MNIST(str(synthetic_data), train=True, transform=transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))]))
    for index in (0, 17, TRAIN_COUNT - 1):
        image, label = reference[index]
        torch.testing.assert_close(images[index], image, rtol=0, atol=1e-6)
        assert labels[index] == label


def test_limits_take_the_first_samples(synthetic_data):
    images, labels = app.load_split(synthetic_data, MNIST_DATA, False, 50, torch.device("cpu"))
    full_images, full_labels = app.load_split(synthetic_data, MNIST_DATA, False, None, torch.device("cpu"))
    assert len(labels) == 50 and torch.equal(images, full_images[:50]) and torch.equal(labels, full_labels[:50])
    assert len(full_labels) == TEST_COUNT


def test_official_gz_files_are_checked_and_extracted(data_copy, monkeypatch):
    """A .gz whose MD5 is the one torchvision lists is extracted in place; nothing is downloaded."""
    raw = data_copy / "MNIST" / "raw"
    resources = []
    for name in FILES:
        with gzip.open(raw / f"{name}.gz", "wb") as archive:
            archive.write((raw / name).read_bytes())
        resources.append((f"{name}.gz", hashlib.md5((raw / f"{name}.gz").read_bytes()).hexdigest()))
        (raw / name).rename(raw / f"{name}.original")
    monkeypatch.setattr(MNIST, "resources", resources)
    app.prepare_files(data_copy, MNIST_DATA, allow_download=False)
    for name in FILES:
        assert (raw / name).read_bytes() == (raw / f"{name}.original").read_bytes()


@pytest.mark.parametrize("download_flag", [["--no-download"], []])
def test_missing_files_exit_2_with_a_message_naming_the_files(tmp_path, download_flag, monkeypatch, cli):
    # A closed local port as the only mirror makes any download fail at once, network or not.
    monkeypatch.setattr(MNIST, "mirrors", ["http://127.0.0.1:9/"])
    monkeypatch.setenv("no_proxy", "*")
    result = cli(*download_flag, "--device", "cpu", "--data-dir", tmp_path / "data", "--out-dir", tmp_path / "out")
    assert result.code == 2
    [error] = result.errors()
    for name in FILES:
        assert f"{name}.gz" in error
    assert str(tmp_path / "data" / "MNIST" / "raw") in error
    assert ("--no-download" if download_flag else "download failed") in error


def test_a_gz_with_the_wrong_md5_is_reported_and_left_alone(data_copy, tmp_path, cli):
    raw = data_copy / "MNIST" / "raw"
    with gzip.open(raw / "train-images-idx3-ubyte.gz", "wb") as archive:
        archive.write((raw / "train-images-idx3-ubyte").read_bytes()[:5000])  # truncated, and not official
    (raw / "train-images-idx3-ubyte").unlink()
    before = fingerprint(raw)
    result = cli(*NO_DOWNLOAD, "--data-dir", data_copy, "--out-dir", tmp_path / "out")
    assert result.code == 2
    [error] = result.errors()
    assert "train-images-idx3-ubyte.gz" in error and "MD5" in error
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
def test_damaged_files_are_named_and_left_as_they_were(data_copy, tmp_path, damage, cli):
    raw = data_copy / "MNIST" / "raw"
    file_name, what = damage(raw)
    before = fingerprint(raw)
    result = cli(*NO_DOWNLOAD, "--data-dir", data_copy, "--out-dir", tmp_path / "out")
    assert result.code == 2
    [error] = result.errors()
    assert file_name in error and what in error
    assert fingerprint(raw) == before


def test_a_data_dir_that_is_a_file_is_refused(tmp_path, cli):
    not_a_folder = tmp_path / "data"
    not_a_folder.write_text("not a folder")
    result = cli("--device", "cpu", "--data-dir", not_a_folder, "--out-dir", tmp_path / "out")
    assert result.code == 2 and "is not a folder" in result.errors()[0]
    assert not_a_folder.read_text() == "not a folder"


def real_mnist_folder():
    """A folder holding the four real MNIST files (extracted or .gz), or None."""
    for folder in (REPO / "data" / "MNIST" / "raw", REPO.parent / "shared" / "mnist"):
        if all((folder / name).is_file() or (folder / f"{name}.gz").is_file() for name in FILES):
            return folder
    return None


@pytest.mark.real_data
@pytest.mark.skipif(real_mnist_folder() is None,
                    reason="real MNIST not found in data/MNIST/raw/ or ../shared/mnist/; "
                           "this 1-epoch accuracy check needs it")
def test_one_epoch_on_real_mnist_reaches_97_5_percent(tmp_path, cli):
    raw = tmp_path / "data" / "MNIST" / "raw"
    shutil.copytree(real_mnist_folder(), raw)
    result = cli("--epochs", 1, *NO_DOWNLOAD, "--data-dir", tmp_path / "data", "--out-dir", tmp_path / "out")
    assert result.code == 0, result.log
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["test_images"] == 10_000
    assert metrics["test_accuracy"] >= 97.5
    assert f"Accuracy of the network on the 10000 test images: {metrics['test_accuracy']:.3f} %" in result.log
