"""companions/using/evaluate.py: a trained model re-checked on its test set or on a folder of labelled
images, into a folder of its own beside the checkpoint; the training run's files are never touched."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import QUICK, TEST_COUNT, digits_side_by_side, labelled_folder
from PIL import Image

import mnist_recognition as app

MNIST_DATA = app.DATASETS["mnist"]


def evaluate_on_the_test_set(cli, checkpoint, data_dir, out_dir, *more):
    return cli(
        "evaluate",
        "--checkpoint",
        checkpoint,
        "--data-dir",
        data_dir,
        "--no-download",
        "--device",
        "cpu",
        "--out-dir",
        out_dir,
        *more,
    )


# --- evaluate ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_evaluate_reproduces_the_accuracy_recorded_by_training(trained, synthetic_data, tmp_path, cli):
    out_dir, _ = trained
    recorded = torch.load(out_dir / "lenet5_mnist.pt", weights_only=True)["eval_accuracy"]
    result = evaluate_on_the_test_set(cli, out_dir / "lenet5_mnist.pt", synthetic_data, tmp_path)
    assert result.code == 0
    assert f"recorded {recorded:.3f} % at the end of training" in result.log
    assert f"Accuracy of the network on the {TEST_COUNT} test images: {recorded:.3f} %" in result.log
    with Image.open(tmp_path / "predictions.png") as image:
        assert image.size == (600, 600)


@pytest.mark.slow
def test_evaluate_claims_no_recorded_test_accuracy_for_a_model_chosen_on_validation(synthetic_data, tmp_path, cli):
    flags = (*QUICK, "--epochs", 1, "--validation", 200, "--data-dir", synthetic_data)
    assert cli(*flags, "--out-dir", tmp_path).code == 0
    result = evaluate_on_the_test_set(cli, tmp_path / "lenet5_mnist.pt", synthetic_data, tmp_path / "evaluated")
    assert result.code == 0 and "Accuracy of the network on the 300 test images" in result.log
    assert "recorded" not in result.log  # what training recorded was a validation accuracy


@pytest.mark.slow
def test_evaluate_with_a_test_limit_counts_only_those_images(trained, synthetic_data, tmp_path, cli):
    result = evaluate_on_the_test_set(cli, trained[0] / "lenet5_mnist.pt", synthetic_data, tmp_path, "--test-limit", 50)
    assert result.code == 0 and "Accuracy of the network on the 50 test images" in result.log


@pytest.mark.slow
def test_evaluate_uses_the_checkpoints_dataset(fashion_trained, tmp_path, cli):
    data_dir, out_dir = fashion_trained
    recorded = torch.load(out_dir / "lenet5_mnist.pt", weights_only=True)["eval_accuracy"]
    result = evaluate_on_the_test_set(cli, out_dir / "lenet5_mnist.pt", data_dir, tmp_path)
    assert result.code == 0  # there is no MNIST/ in data_dir: the checkpoint's FashionMNIST/ was read
    assert f"test images: {recorded:.3f} %" in result.log and "Accuracy per class: T-shirt/top" in result.log


# --- a folder of its own: the training run's files stay as training wrote them ----------------------


def digests(folder):
    """Every file under `folder` (not in sub-folders) by name, with its sha256."""
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in folder.iterdir() if path.is_file()}


@pytest.mark.slow
def test_the_commands_after_training_leave_its_files_as_they_were(trained, synthetic_data, tmp_path, cli):
    """As a new user runs them, with every default folder: train, finetune, evaluate, evaluate --images."""
    outputs = tmp_path / "outputs"
    shutil.copytree(trained[0], outputs)
    as_trained = digests(outputs)
    mine = labelled_folder(tmp_path / "mine", per_class=3)
    model = outputs / "lenet5_mnist.pt"
    data = ("--data-dir", synthetic_data, "--no-download", "--device", "cpu")
    finetuned = cli("finetune", "--checkpoint", model, "--images", mine, "--steps", 2, *data)
    evaluated = cli("evaluate", "--checkpoint", model, *data)
    on_mine = cli("evaluate", "--checkpoint", model, "--images", mine, "--device", "cpu")
    assert (finetuned.code, evaluated.code, on_mine.code) == (0, 0, 0)
    assert digests(outputs) == as_trained
    written = "metrics.json, report.html, confusion_matrix.png, mistakes.png, predictions.png, calibration.png"
    assert f"into {outputs / 'finetuned'}/" in finetuned.log
    assert f"Wrote {written} into {outputs / 'evaluation'}/" in evaluated.log
    assert f"Wrote {written} into {outputs / 'evaluation-mine'}/" in on_mine.log
    on_test_set = json.loads((outputs / "evaluation" / "metrics.json").read_text())
    assert on_test_set["command"] == "evaluate" and on_test_set["eval_split"] == "test"
    assert on_test_set["eval_images"] == TEST_COUNT and on_test_set["images"] is None
    recorded = json.loads((outputs / "metrics.json").read_text())
    assert on_test_set["eval_accuracy"] == recorded["eval_accuracy"]
    assert on_test_set["confusion_matrix"] == recorded["confusion_matrix"]
    assert json.loads((outputs / "evaluation-mine" / "metrics.json").read_text())["images"] == str(mine)


def test_evaluate_refuses_a_folder_that_holds_a_training_run(trained, synthetic_data, tmp_path, cli):
    outputs = tmp_path / "outputs"
    shutil.copytree(trained[0], outputs)
    as_trained = digests(outputs)
    result = evaluate_on_the_test_set(cli, outputs / "lenet5_mnist.pt", synthetic_data, outputs)
    assert result.code == 2 and len(result.errors()) == 1
    assert f"{outputs} holds the results of 'train', and 'evaluate' does not write over them" in result.errors()[0]
    assert digests(outputs) == as_trained


# --- bad input: one line, an exit code, nothing written ---------------------------------------------


def test_an_unreadable_images_folder_is_one_line_and_no_folder_is_made(trained, tmp_path, cli, refusing):
    mine = labelled_folder(tmp_path / "mine", per_class=2)
    refusing.unreadable(mine)
    result = cli(
        "evaluate", "--checkpoint", trained[0] / "lenet5_mnist.pt", "--images", mine, "--out-dir", tmp_path / "out"
    )
    assert result.code == 2 and len(result.errors()) == 1 and "Traceback" not in result.log
    assert f"--images {mine}: cannot be read (Permission denied)" in result.errors()[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_an_unreadable_class_folder_is_named_and_the_rest_is_read(trained, tmp_path, cli, refusing):
    mine = labelled_folder(tmp_path / "mine", per_class=2)
    refusing.unreadable(mine / "3")
    result = cli(
        "evaluate", "--checkpoint", trained[0] / "lenet5_mnist.pt", "--images", mine, "--out-dir", tmp_path / "out"
    )
    assert result.code == 1 and result.errors() and "Traceback" not in result.log
    assert f"{mine / '3'}: cannot be read (Permission denied)" in result.errors()[0]
    assert "Accuracy of the network on the 18 images in" in result.log


def test_a_read_only_output_folder_is_one_line(trained, synthetic_data, tmp_path, cli, refusing):
    (tmp_path / "out").mkdir()
    refusing.read_only(tmp_path / "out")
    result = evaluate_on_the_test_set(cli, trained[0] / "lenet5_mnist.pt", synthetic_data, tmp_path / "out")
    assert result.code == 2 and len(result.errors()) == 1 and "Traceback" not in result.log
    assert f"Cannot write into the output folder {tmp_path / 'out'}: Permission denied" in result.errors()[0]
    assert list((tmp_path / "out").iterdir()) == []


# --- a folder of whole numbers ----------------------------------------------------------------------


def numbers_folder(folder, labels):
    """Images of numbers, each named for its number, and labels.json that gives them."""
    folder.mkdir()
    for index, number in enumerate(labels):
        digits_side_by_side([int(digit) for digit in number], seed=10 * index).save(folder / f"{number}.png")
    (folder / "labels.json").write_text(json.dumps({f"{number}.png": number for number in labels}))
    return folder


def test_evaluate_reads_a_folder_of_numbers_and_counts_numbers_and_digits_right(trained, tmp_path, cli):
    checkpoint = trained[0] / "lenet5_mnist.pt"
    folder = numbers_folder(tmp_path / "numbers", ["2026", "314", "55"])
    result = cli("evaluate", "--checkpoint", checkpoint, "--images", folder, "--out-dir", tmp_path / "out")
    assert result.code == 0, result.log
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    read = {answer["file"]: answer["read"] for answer in metrics["answers"]}
    predicted = json.loads(cli("predict", *sorted(folder.glob("*.png")), "--checkpoint", checkpoint, "--json").stdout)
    assert read == {Path(answer["file"]).name: answer["number"] for answer in predicted}  # predict's answers
    right = sum(read[f"{number}.png"] == number for number in ("2026", "314", "55"))
    assert metrics["numbers"] == 3 and metrics["numbers_right"] == pytest.approx(100 * right / 3)
    assert metrics["digits"] == 9 and 0 <= metrics["digits_right"] <= 100
    assert f"{right} of 3 read right" in result.log


def test_digits_read_right_count_misread_missing_and_extra_digits():
    from companions.using.evaluate import matched_digits

    assert matched_digits("2026", "2026") == 4
    assert matched_digits("2026", "2028") == 3  # one misread
    assert matched_digits("2026", "226") == 3  # one left out
    assert matched_digits("2026", "20126") == 4  # one too many: all four found, in order
    assert matched_digits("2026", "") == 0


@pytest.mark.parametrize(
    "labels, said",
    [
        ("not json", "cannot be read as JSON"),
        ('["2026"]', "give each image's number"),
        ('{"a.png": 2026}', "is not a string of digits"),
        ('{"a.png": "20-26"}', "is not a string of digits"),
        ('{"../a.png": "1"}', "is not a file name in"),
    ],
)
def test_a_labels_file_that_does_not_give_numbers_is_one_line(labels, said, trained, tmp_path, cli):
    folder = tmp_path / "numbers"
    folder.mkdir()
    (folder / "labels.json").write_text(labels)
    result = cli("evaluate", "--checkpoint", trained[0] / "lenet5_mnist.pt", "--images", folder)
    assert result.code == 2 and said in result.errors()[0] and not (trained[0] / "evaluation-numbers").exists()


def test_a_missing_number_image_is_named_and_the_rest_are_read(trained, tmp_path, cli):
    folder = numbers_folder(tmp_path / "numbers", ["71"])
    (folder / "labels.json").write_text(json.dumps({"71.png": "71", "gone.png": "5"}))
    checkpoint = trained[0] / "lenet5_mnist.pt"
    result = cli("evaluate", "--checkpoint", checkpoint, "--images", folder, "--out-dir", tmp_path / "o")
    assert result.code == 1 and "gone.png: no such file" in result.errors()[0]
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["numbers"] == 1
