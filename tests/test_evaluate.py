"""companions/evaluate.py: a trained model re-checked on its test set."""

import torch
from conftest import QUICK, TEST_COUNT
from PIL import Image

import mnist_recognition as app

MNIST_DATA = app.DATASETS["mnist"]

# --- evaluate ------------------------------------------------------------------------------------


def test_evaluate_reproduces_the_accuracy_recorded_by_training(trained, synthetic_data, tmp_path, cli):
    out_dir, _ = trained
    recorded = torch.load(out_dir / "lenet5_mnist.pt", weights_only=True)["eval_accuracy"]
    result = cli(
        "evaluate",
        "--checkpoint",
        out_dir / "lenet5_mnist.pt",
        "--data-dir",
        synthetic_data,
        "--no-download",
        "--device",
        "cpu",
        "--out-dir",
        tmp_path,
    )
    assert result.code == 0
    assert f"recorded {recorded:.3f} % at the end of training" in result.log
    assert f"Accuracy of the network on the {TEST_COUNT} test images: {recorded:.3f} %" in result.log
    with Image.open(tmp_path / "predictions.png") as image:
        assert image.size == (600, 600)


def test_evaluate_claims_no_recorded_test_accuracy_for_a_model_chosen_on_validation(synthetic_data, tmp_path, cli):
    flags = (*QUICK, "--epochs", 1, "--validation", 200, "--data-dir", synthetic_data)
    assert cli(*flags, "--out-dir", tmp_path).code == 0
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
    assert result.code == 0 and "Accuracy of the network on the 300 test images" in result.log
    assert "recorded" not in result.log  # what training recorded was a validation accuracy


def test_evaluate_with_a_test_limit_counts_only_those_images(trained, synthetic_data, tmp_path, cli):
    result = cli(
        "evaluate",
        "--checkpoint",
        trained[0] / "lenet5_mnist.pt",
        "--data-dir",
        synthetic_data,
        "--no-download",
        "--device",
        "cpu",
        "--out-dir",
        tmp_path,
        "--test-limit",
        50,
    )
    assert result.code == 0 and "Accuracy of the network on the 50 test images" in result.log


def test_evaluate_uses_the_checkpoints_dataset(fashion_trained, tmp_path, cli):
    data_dir, out_dir = fashion_trained
    recorded = torch.load(out_dir / "lenet5_mnist.pt", weights_only=True)["eval_accuracy"]
    result = cli(
        "evaluate",
        "--checkpoint",
        out_dir / "lenet5_mnist.pt",
        "--data-dir",
        data_dir,
        "--no-download",
        "--device",
        "cpu",
        "--out-dir",
        tmp_path,
    )
    assert result.code == 0  # there is no MNIST/ in data_dir: the checkpoint's FashionMNIST/ was read
    assert f"test images: {recorded:.3f} %" in result.log and "Accuracy per class: T-shirt/top" in result.log
