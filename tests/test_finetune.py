"""companions/using/finetune.py: a trained model taught a writer's own digits, measured on their held-out
digits before and after, and written into a folder of its own, never over the model it started from."""

import hashlib
import json
import random

import pytest
import torch
from conftest import draw_digit, labelled_folder

from companions.using.finetune import stratified_hold_out


def slanted_writer(folder, per_class, seed):
    """A writer the synthetic training set has not seen: every digit slanted by about 30 degrees,
    dark on light paper, in one sub-folder per class."""
    rng = random.Random(seed)
    for digit in range(10):
        (folder / str(digit)).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            image = draw_digit(digit, rng, size=28, ink=0, paper=255).rotate(30 + rng.uniform(-4, 4), fillcolor=255)
            image.resize((112, 112)).save(folder / str(digit) / f"{index}.png")
    return folder


def finetune(cli, checkpoint, images, data_dir, *flags):
    return cli(
        "finetune",
        "--checkpoint",
        checkpoint,
        "--images",
        images,
        "--data-dir",
        data_dir,
        "--no-download",
        "--device",
        "cpu",
        *flags,
    )


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_finetune_raises_the_accuracy_on_a_writers_held_out_digits(trained, synthetic_data, tmp_path, cli):
    writer = slanted_writer(tmp_path / "writer", per_class=12, seed=2)
    flags = ("--steps", 100, "--batch-size", 32, "--out-dir", tmp_path / "tuned")
    result = finetune(cli, trained[0] / "lenet5_mnist.pt", writer, synthetic_data, *flags)
    assert result.code == 0, result.log
    assert "90 of your images to learn from, 30 held out to measure on (seed 0)" in result.log
    metrics = json.loads((tmp_path / "tuned" / "metrics.json").read_text())
    before, after = metrics["held_out_accuracy_before"], metrics["held_out_accuracy"]
    assert f"Accuracy on the held-out images of yours: {before:.2f} % before, {after:.2f} % after" in result.log
    assert before < 60 and after >= before + 20, (before, after)
    saved = torch.load(tmp_path / "tuned" / "lenet5_mnist.pt", weights_only=True)
    assert saved["fine_tuned"] == {key: value for key, value in metrics.items() if key not in ("command", "doubt")}
    # Calibrated anew for the fine-tuned weights; the detector is the model's own, kept.
    started_from = torch.load(trained[0] / "lenet5_mnist.pt", weights_only=True)["doubt"]
    assert saved["doubt"]["temperature"] == metrics["doubt"]["temperature"]
    assert saved["doubt"]["not_a_digit_above"] == started_from["not_a_digit_above"]
    assert all(torch.equal(saved["doubt"]["detector"][k], v) for k, v in started_from["detector"].items())
    assert saved["fine_tuned"]["per_class"] == {str(d): 12 for d in range(10)} and saved["fine_tuned"]["held_out"] == 30
    assert saved["config"]["dataset"] == "mnist" and saved["eval_split"] == "test"
    assert metrics["command"] == "finetune" and metrics["test_accuracy"] == saved["eval_accuracy"]
    assert cli("predict", writer / "3" / "0.png", "--checkpoint", tmp_path / "tuned" / "lenet5_mnist.pt").code == 0


@pytest.mark.slow
def test_the_same_seed_fine_tunes_the_same_model_bit_for_bit(trained, synthetic_data, tmp_path, cli):
    writer = labelled_folder(tmp_path / "mine", per_class=4, seed=1)
    for out_dir in ("first", "second"):
        flags = ("--steps", 10, "--batch-size", 32, "--out-dir", tmp_path / out_dir)
        assert finetune(cli, trained[0] / "lenet5_mnist.pt", writer, synthetic_data, *flags).code == 0
    first, second = (
        torch.load(tmp_path / name / "lenet5_mnist.pt", weights_only=True)["model"] for name in ("first", "second")
    )
    assert all(torch.equal(tensor, second[name]) for name, tensor in first.items())


def test_finetune_writes_beside_the_checkpoint_and_never_over_a_model_it_did_not_make(
    trained, synthetic_data, tmp_path, cli
):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    for name in ("lenet5_mnist.pt", "metrics.json"):
        (outputs / name).write_bytes((trained[0] / name).read_bytes())
    model = outputs / "lenet5_mnist.pt"
    writer = labelled_folder(tmp_path / "mine", per_class=2, seed=1)
    result = finetune(cli, model, writer, synthetic_data, "--steps", 2)
    assert result.code == 0, result.log
    assert f"Wrote lenet5_mnist.pt, metrics.json into {outputs / 'finetuned'}/" in result.log
    assert f"Use it with --checkpoint {outputs / 'finetuned' / 'lenet5_mnist.pt'}" in result.log
    assert digest(model) == digest(trained[0] / "lenet5_mnist.pt")

    # Into the training run's folder, over the model it starts from, or over a model no command made there.
    tuned = outputs / "finetuned" / "lenet5_mnist.pt"
    stranger = tmp_path / "a model of my own"
    stranger.mkdir()
    (stranger / "lenet5_mnist.pt").write_bytes(model.read_bytes())
    for checkpoint, out_dir, refusal in (
        (model, outputs, "lenet5_mnist.pt is the --checkpoint that finetune starts from"),
        (tuned, outputs, f"{outputs} holds the results of 'train', and 'finetune' does not write over them"),
        (
            tuned,
            outputs / "finetuned",
            "is the --checkpoint that finetune starts from, and finetune never writes over it",
        ),
        (model, stranger, "already holds lenet5_mnist.pt, which 'finetune' did not write"),
    ):
        before = {path: digest(path) for path in (model, tuned, stranger / "lenet5_mnist.pt")}
        result = finetune(cli, checkpoint, writer, synthetic_data, "--steps", 2, "--out-dir", out_dir)
        assert result.code == 2 and len(result.errors()) == 1 and refusal in result.errors()[0]
        assert before == {path: digest(path) for path in before}
        assert "--out-dir" in result.errors()[0]


def test_finetune_warns_about_small_classes_and_holds_out_one_of_each_pair(trained, synthetic_data, tmp_path, cli):
    folder = labelled_folder(tmp_path / "mine", per_class=2, classes=(0, 1))
    labelled_folder(folder, per_class=1, classes=(2,))
    result = finetune(
        cli, trained[0] / "lenet5_mnist.pt", folder, synthetic_data, "--steps", 5, "--out-dir", tmp_path / "tuned"
    )
    assert result.code == 0, result.log
    assert "Fewer than 5 images of 0 (2), 1 (2), 2 (1)" in result.log
    assert "3 of your images to learn from, 2 held out" in result.log


def test_the_hold_out_is_stratified_seeded_and_never_a_whole_class():
    labels = torch.tensor([0] * 8 + [1] * 4 + [2] * 2 + [3])
    held = stratified_hold_out(labels, 0.25, seed=0)
    assert [int((labels[held] == c).sum()) for c in range(4)] == [2, 1, 1, 0]
    assert held == stratified_hold_out(labels, 0.25, seed=0) and held != stratified_hold_out(labels, 0.25, seed=1)


# --- bad input: one line, exit code 2, nothing written ----------------------------------------------


def test_an_unreadable_images_folder_is_one_line_and_no_folder_is_made(
    trained, synthetic_data, tmp_path, cli, refusing
):
    writer = labelled_folder(tmp_path / "mine", per_class=2)
    refusing.unreadable(writer)
    result = finetune(cli, trained[0] / "lenet5_mnist.pt", writer, synthetic_data, "--out-dir", tmp_path / "tuned")
    assert result.code == 2 and len(result.errors()) == 1
    assert f"--images {writer}: cannot be read (Permission denied)" in result.errors()[0]
    assert "Traceback" not in result.log and not (tmp_path / "tuned").exists()


def test_a_read_only_output_folder_is_one_line(trained, synthetic_data, tmp_path, cli, refusing):
    writer = labelled_folder(tmp_path / "mine", per_class=2)
    (tmp_path / "tuned").mkdir()
    refusing.read_only(tmp_path / "tuned")
    result = finetune(
        cli, trained[0] / "lenet5_mnist.pt", writer, synthetic_data, "--steps", 2, "--out-dir", tmp_path / "tuned"
    )
    assert result.code == 2 and len(result.errors()) == 1
    assert f"Cannot write into the output folder {tmp_path / 'tuned'}: Permission denied" in result.errors()[0]
    assert "Traceback" not in result.log and list((tmp_path / "tuned").iterdir()) == []
