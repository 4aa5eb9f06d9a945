"""Data: offline use, clear errors for missing or damaged files, and the user's files left alone."""

import gzip
import hashlib
import json
import shutil
import struct

import pytest
import torch
from conftest import DATASET_FILES, TEST_COUNT, TRAIN_COUNT, real_dataset_folder, without
from torchvision.datasets import MNIST

import mnist_recognition as app
from companions.using import prepare

NO_DOWNLOAD = ("--no-download", "--device", "cpu")
MNIST_DATA = app.DATASETS["mnist"]


def fingerprint(folder):
    return {path.name: hashlib.md5(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


@pytest.fixture
def data_copy(tmp_path, synthetic_data):
    copy = tmp_path / "data"
    shutil.copytree(synthetic_data, copy)
    return copy


def test_the_files_are_read_as_torchvision_reads_them(synthetic_data):
    pixels, labels = app.raw_split(synthetic_data, MNIST_DATA, train=True)
    reference = MNIST(str(synthetic_data), train=True)
    assert torch.equal(pixels, reference.data) and torch.equal(labels, reference.targets)
    assert labels.dtype == reference.targets.dtype == torch.int64


@pytest.mark.slow
def test_training_and_evaluating_on_files_present_need_no_torchvision(synthetic_data, tmp_path, monkeypatch, cli):
    """Importing torchvision takes longer than reading the files; it is needed only to check, extract or fetch them."""
    without(monkeypatch, "torchvision")
    flags = (*NO_DOWNLOAD, "--test-limit", 32, "--data-dir", synthetic_data)
    assert cli("--epochs", 1, "--train-limit", 64, *flags, "--out-dir", tmp_path).code == 0
    assert cli("evaluate", "--checkpoint", tmp_path / "lenet5_mnist.pt", *flags).code == 0


def test_load_split_normalises_like_totensor_then_normalize(synthetic_data):
    from torchvision import datasets, transforms

    images, labels = app.normalised_split(synthetic_data, MNIST_DATA, True, None, torch.device("cpu"))
    assert images.shape == (TRAIN_COUNT, 1, 28, 28) and labels.shape == (TRAIN_COUNT,)
    reference = datasets.MNIST(
        str(synthetic_data),
        train=True,
        transform=transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))]),
    )
    for index in (0, 17, TRAIN_COUNT - 1):
        image, label = reference[index]
        torch.testing.assert_close(images[index], image, rtol=0, atol=1e-6)
        assert labels[index] == label


def test_limits_take_the_first_samples(synthetic_data):
    images, labels = app.normalised_split(synthetic_data, MNIST_DATA, False, 50, torch.device("cpu"))
    full_images, full_labels = app.normalised_split(synthetic_data, MNIST_DATA, False, None, torch.device("cpu"))
    assert len(labels) == 50 and torch.equal(images, full_images[:50]) and torch.equal(labels, full_labels[:50])
    assert len(full_labels) == TEST_COUNT


def test_official_gz_files_are_checked_and_extracted(data_copy, monkeypatch):
    """A .gz whose MD5 is the one torchvision lists is extracted in place; nothing is downloaded."""
    raw = data_copy / "MNIST" / "raw"
    official_gz_only(raw, monkeypatch)
    app.prepare_files(data_copy, MNIST_DATA, allow_download=False)
    for name in DATASET_FILES:
        assert (raw / name).read_bytes() == (raw / f"{name}.original").read_bytes()


def official_gz_only(raw, monkeypatch):
    """The folder's four files gzipped, with MD5 sums made official for this test, and the extracted
    files moved away: as a user's folder holding only the files they downloaded."""
    resources = []
    for name in DATASET_FILES:
        with gzip.open(raw / f"{name}.gz", "wb") as archive:
            archive.write((raw / name).read_bytes())
        resources.append((f"{name}.gz", hashlib.md5((raw / f"{name}.gz").read_bytes()).hexdigest()))
        (raw / name).rename(raw / f"{name}.original")
    monkeypatch.setattr(MNIST, "resources", resources)


def test_a_read_only_data_folder_that_needs_extracting_is_one_line(data_copy, tmp_path, monkeypatch, cli, refusing):
    raw = data_copy / "MNIST" / "raw"
    official_gz_only(raw, monkeypatch)
    before = fingerprint(raw)
    refusing.read_only(raw)
    result = cli(*NO_DOWNLOAD, "--data-dir", data_copy, "--out-dir", tmp_path / "out")
    assert result.code == 2 and len(result.errors()) == 1 and "Traceback" not in result.log
    assert f"Cannot use the data folder {raw}" in result.errors()[0] and "Permission denied" in result.errors()[0]
    assert "gunzip -k" in result.errors()[0]
    assert fingerprint(raw) == before and not (tmp_path / "out").exists()


def test_an_unreadable_data_folder_is_one_line(data_copy, tmp_path, cli, refusing):
    raw = data_copy / "MNIST" / "raw"
    refusing.unreadable(raw)
    result = cli(*NO_DOWNLOAD, "--data-dir", data_copy, "--out-dir", tmp_path / "out")
    assert result.code == 2 and len(result.errors()) == 1 and "Traceback" not in result.log
    assert "cannot be read (Permission denied)" in result.errors()[0] and str(raw) in result.errors()[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("download_flag", [["--no-download"], []])
def test_missing_files_exit_2_with_a_message_naming_the_files(tmp_path, download_flag, monkeypatch, cli):
    # A closed local port as the only mirror makes any download fail at once, network or not.
    monkeypatch.setattr(MNIST, "mirrors", ["http://127.0.0.1:9/"])
    monkeypatch.setenv("no_proxy", "*")
    result = cli(*download_flag, "--device", "cpu", "--data-dir", tmp_path / "data", "--out-dir", tmp_path / "out")
    assert result.code == 2
    [error] = result.errors()
    for name in DATASET_FILES:
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
    path.write_bytes(data[:4] + struct.pack(">I", count) + data[8 : 8 + count])
    return "t10k-labels-idx1-ubyte", "labels for the"


def damage_empty(raw):
    (raw / "train-labels-idx1-ubyte").write_bytes(b"")
    return "train-labels-idx1-ubyte", "too short"


@pytest.mark.parametrize("damage", [damage_magic, damage_image_size, damage_truncate, damage_label_count, damage_empty])
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


@pytest.mark.slow
@pytest.mark.real_data
def test_one_epoch_on_real_mnist_reads_98_5_percent_of_its_test_images(real_fast):
    """The `fast` recipe's one epoch (its seeds read 98.9 to 99.1 %)."""
    metrics = json.loads((real_fast / "metrics.json").read_text())
    assert metrics["config"]["epochs"] == 1 and metrics["eval_split"] == "test" and metrics["eval_images"] == 10_000
    assert metrics["eval_accuracy"] >= 98.5


# --- other datasets in MNIST's format ------------------------------------------------------------


def test_every_dataset_entry_is_complete():
    [choices] = [setting.choices for setting in app.SETTINGS if setting.name == "dataset"]
    assert choices == tuple(app.DATASETS)
    for name, dataset in app.DATASETS.items():
        assert dataset.name == name and len(dataset.classes) == 10 == len(set(dataset.classes))
        assert 0 < dataset.mean < 1 and 0 < dataset.std < 1
        assert dataset.image_kind in prepare.PREPARE_BY_KIND
        assert set(dataset.augment_limits) == {
            "degrees",
            "scale",
            "shear_degrees",
            "shift_pixels",
            "mirror",
            "elastic_sigma_pixels",
            "elastic_alpha_pixels",
            "thickness",
        }
        torchvision_class = dataset.torchvision_class()
        assert torchvision_class.__name__ == dataset.folder and len(torchvision_class.resources) == 4
        if name != "mnist":  # torchvision names MNIST's classes "0 - zero" and so on
            assert dataset.classes == tuple(torchvision_class.classes)


@pytest.fixture(scope="module")
def synthetic_kin(tmp_path_factory, synthetic_data):
    """The synthetic files for every dataset, each in its own torchvision folder under one data folder."""
    data_dir = tmp_path_factory.mktemp("kin") / "data"
    for dataset in app.DATASETS.values():
        shutil.copytree(synthetic_data / "MNIST" / "raw", data_dir / dataset.folder / "raw")
    return data_dir


@pytest.mark.parametrize("name", ["fashion-mnist", "kmnist"])
def test_missing_files_of_another_dataset_name_its_folder_and_files(name, tmp_path, cli):
    dataset = app.DATASETS[name]
    result = cli("--dataset", name, *NO_DOWNLOAD, "--data-dir", tmp_path / "data", "--out-dir", tmp_path / "out")
    assert result.code == 2
    [error] = result.errors()
    assert dataset.title in error and str(tmp_path / "data" / dataset.folder / "raw") in error
    assert all(archive in error for archive, _ in dataset.torchvision_class().resources)


@pytest.mark.parametrize("name", ["fashion-mnist", "kmnist"])
@pytest.mark.parametrize("damage", [damage_magic, damage_truncate, damage_label_count])
def test_damaged_files_of_another_dataset_are_named_and_left_alone(name, damage, synthetic_kin, tmp_path, cli):
    data_dir = tmp_path / "data"
    shutil.copytree(synthetic_kin, data_dir)
    raw = data_dir / app.DATASETS[name].folder / "raw"
    file_name, what = damage(raw)
    before = fingerprint(raw)
    result = cli("--dataset", name, *NO_DOWNLOAD, "--data-dir", data_dir, "--out-dir", tmp_path / "out")
    assert result.code == 2
    [error] = result.errors()
    assert str(raw / file_name) in error and what in error
    assert fingerprint(raw) == before


def test_a_fashion_gz_with_the_wrong_md5_is_reported(synthetic_kin, tmp_path, cli):
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    with gzip.open(raw / "train-images-idx3-ubyte.gz", "wb") as archive:
        archive.write(b"not the official file")
    result = cli(
        "--dataset", "fashion-mnist", *NO_DOWNLOAD, "--data-dir", tmp_path / "data", "--out-dir", tmp_path / "o"
    )
    assert result.code == 2
    assert (
        "train-images-idx3-ubyte.gz" in result.errors()[0] and "8d4fb7e6c68d591d4c3dfef9ec88bf0d" in result.errors()[0]
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fashion-mnist", "kmnist"])
def test_another_dataset_trains_from_its_own_folder_with_its_class_names(name, synthetic_kin, tmp_path, cli):
    dataset = app.DATASETS[name]
    result = cli(
        "--dataset",
        name,
        *NO_DOWNLOAD,
        "--epochs",
        1,
        "--batch-size",
        32,
        "--data-dir",
        synthetic_kin,
        "--out-dir",
        tmp_path,
    )
    assert result.code == 0
    assert f"Accuracy per class: {dataset.classes[0]} " in result.log and f", {dataset.classes[9]} " in result.log
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["dataset"] == name and metrics["classes"] == list(dataset.classes)
    assert torch.load(tmp_path / "lenet5_mnist.pt", weights_only=True)["config"]["dataset"] == name
    page = (tmp_path / "report.html").read_text()
    assert f"LeNet-5 (61,706 parameters) on {dataset.title}" in page and f"<td>{dataset.classes[3]}</td>" in page
    images, _ = app.normalised_split(synthetic_kin, dataset, False, 5, torch.device("cpu"))
    pixels = (
        MNIST_DATA.std * app.normalised_split(synthetic_kin, MNIST_DATA, False, 5, torch.device("cpu"))[0]
        + MNIST_DATA.mean
    )
    torch.testing.assert_close(images * dataset.std + dataset.mean, pixels)  # its own normalisation, undone


@pytest.mark.slow
@pytest.mark.real_data
@pytest.mark.parametrize("name, shared_name", [("mnist", "mnist"), ("fashion-mnist", "fashion-mnist")])
def test_the_normalisation_is_the_mean_and_std_of_the_real_training_pixels(name, shared_name, tmp_path):
    dataset = app.DATASETS[name]
    folder = real_dataset_folder(shared_name, dataset.folder)
    shutil.copytree(folder, tmp_path / dataset.folder / "raw")
    app.prepare_files(tmp_path, dataset, allow_download=False)
    pixels = dataset.torchvision_class()(str(tmp_path), train=True).data.double().div(255)
    assert (round(pixels.mean().item(), 4), round(pixels.std(unbiased=False).item(), 4)) == (dataset.mean, dataset.std)


@pytest.mark.slow
@pytest.mark.real_data
def test_one_epoch_on_real_fashion_mnist_reaches_85_percent(tmp_path, cli):
    folder = real_dataset_folder("fashion-mnist", "FashionMNIST")
    shutil.copytree(folder, tmp_path / "data" / "FashionMNIST" / "raw")
    # One epoch of the original recipe gives about 83 %; with a one-cycle schedule about 87 %.
    result = cli(
        "--dataset",
        "fashion-mnist",
        "--epochs",
        1,
        "--schedule",
        "onecycle",
        "--lr",
        "1e-2",
        "--no-detector",  # accuracy alone: no need to learn Fashion-MNIST's detector here
        "--no-figures",
        *NO_DOWNLOAD,
        "--data-dir",
        tmp_path / "data",
        "--out-dir",
        tmp_path / "out",
    )
    assert result.code == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["eval_images"] == 10_000 and metrics["eval_accuracy"] >= 85
    assert "Accuracy per class: T-shirt/top" in result.log
