"""companions/auditing/: audit finds the planted wrong labels of a training split (read fold by fold
by models that never learned them), of the test split and of a folder; a rerun trains nothing; the
folder is never changed; bad input is one line and exit 2 with nothing written; and --exclude
leaves the suspects out of training and of finetune."""

import hashlib
import json
import shutil

import pytest
import torch
from conftest import labelled_folder, write_idx_labels

import mnist_recognition as app
from companions.auditing import audit, suspects
from companions.experiments import compare

QUICK = ("--no-download", "--device", "cpu")
# The folds' training on the small synthetic split: enough steps to read its digits.
FOLD_TRAINING = ("--epochs", 3, "--batch-size", 32, "--lr", 3e-3, "--recipe", "original")


def flipped_data(synthetic_data, folder, count):
    """A copy of the synthetic data with `count` training labels (every 37th from the 5th) changed."""
    shutil.copytree(synthetic_data, folder)
    path = folder / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    labels = list(path.read_bytes()[8:])
    flipped = [5 + 37 * k for k in range(count)]
    for index in flipped:
        labels[index] = (labels[index] + 3) % 10
    write_idx_labels(path, labels)
    return folder, flipped


def fingerprint(folder):
    paths = sorted(path for path in folder.rglob("*") if path.is_file())
    return {str(path): hashlib.sha256(path.read_bytes()).hexdigest() for path in paths}


def audit_json(out_dir):
    return json.loads((out_dir / "audit.json").read_text())


@pytest.fixture(scope="module")
def training_audit(synthetic_data, tmp_path_factory):
    """audit --split train on a copy of the synthetic data with 12 labels flipped: (out dir, flipped)."""
    root = tmp_path_factory.mktemp("audit")
    data_dir, flipped = flipped_data(synthetic_data, root / "data", 12)
    out_dir = root / "audit"
    flags = ("audit", "--split", "train", "--folds", 3, *FOLD_TRAINING, "--workers", 1, *QUICK)
    assert app.main([str(flag) for flag in (*flags, "--data-dir", data_dir, "--out-dir", out_dir)]) == 0
    return out_dir, flipped, flags, data_dir


@pytest.mark.slow
def test_the_planted_labels_are_the_strongest_suspects_of_the_training_split(training_audit):
    out_dir, flipped, _, _ = training_audit
    found = audit_json(out_dir)
    ranked = [entry["index"] for entry in found["suspects"]]
    assert found["split"] == "train" and found["images"] == 1200
    assert len(set(ranked[: len(flipped)]) & set(flipped)) >= 9
    for entry in found["suspects"]:
        assert entry["suggested"] != entry["given"] and abs(sum(entry["probabilities"]) - 1) < 1e-3
    assert [entry["score"] for entry in found["suspects"]] == sorted(entry["score"] for entry in found["suspects"])
    page = (out_dir / "audit.html").read_text()
    assert page.count('class="suspect"') == len(ranked) and (out_dir / "suspects.png").stat().st_size > 0
    confident = sum(entry["confident"] for entry in found["suspects"])
    assert page.count('data-confident="true">') == confident == found["confident"]


@pytest.mark.slow
def test_each_fold_is_read_by_a_model_trained_without_it(training_audit):
    out_dir, _, _, _ = training_audit
    held_out = [set(json.loads(path.read_text())) for path in sorted((out_dir / "folds").glob("*.json"))]
    assert len(held_out) == 3 and set().union(*held_out) == set(range(1200)) and sum(map(len, held_out)) == 1200
    for number in range(3):
        log = (out_dir / "logs" / f"fold-{number}-of-3.log").read_text()
        assert "Left out 400 training images" in log and "800 training" in log
    # Each suspect's probabilities are those of the fold that held it out, at that model's temperature.
    results = [torch.load(path, weights_only=True) for path in sorted((out_dir / "results").glob("*.pt"))]
    for entry in audit_json(out_dir)["suspects"][:5]:
        (result,) = [result for result in results if entry["index"] in result["held_out"].tolist()]
        logits = result["train"][result["held_out"].tolist().index(entry["index"])]
        expected = torch.softmax(logits / result["temperature"], 0)
        torch.testing.assert_close(torch.tensor(entry["probabilities"]), expected, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_a_rerun_trains_nothing_and_answers_the_same(training_audit, cli):
    out_dir, _, flags, data_dir = training_audit
    before = (out_dir / "audit.json").read_bytes()
    result = cli(*flags, "--data-dir", data_dir, "--out-dir", out_dir)
    assert result.code == 0 and "3 of 3 folds are trained already; training the other 0" in result.log
    assert (out_dir / "audit.json").read_bytes() == before


@pytest.mark.slow
def test_training_with_exclude_leaves_the_suspects_out(training_audit, tmp_path, cli):
    out_dir, _, _, data_dir = training_audit
    count = len(audit_json(out_dir)["suspects"])
    result = cli("--epochs", 1, "--no-figures", *QUICK, "--data-dir", data_dir, "--out-dir", tmp_path / "run",
                 "--exclude", out_dir / "audit.json")  # fmt: skip
    assert result.code == 0 and f"Left out {count} training images that" in result.log
    assert f"{1200 - count} training and 300 test images" in result.log
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["config"]["exclude"] == str(
        out_dir / "audit.json"
    )


def test_compare_varies_exclude_as_any_setting():
    variant = compare.parse_spec("exclude=outputs/audit/audit.json")
    assert variant.flags == ("--exclude", "outputs/audit/audit.json")


@pytest.mark.slow
def test_the_test_split_is_read_by_the_given_model(trained, synthetic_data, tmp_path, cli):
    checkpoint = trained[0] / "lenet5_mnist.pt"
    result = cli("audit", "--split", "test", "--checkpoint", checkpoint, "--data-dir", synthetic_data, *QUICK,
                 "--out-dir", tmp_path / "audit")  # fmt: skip
    found = audit_json(tmp_path / "audit")
    assert result.code == 0 and found["split"] == "test" and found["images"] == 300
    assert found["read_by"] == str(checkpoint) and all("index" in entry for entry in found["suspects"])
    assert "suspects among 300 images" in result.log


@pytest.mark.slow
def test_a_folders_misfiled_images_are_found_and_the_folder_is_left_as_it_was(trained, synthetic_data, tmp_path, cli):
    folder = labelled_folder(tmp_path / "mine", per_class=6)
    misfiled = [folder / "5" / "moved-3.png", folder / "1" / "moved-7.png"]
    (folder / "3" / "0.png").rename(misfiled[0])
    (folder / "7" / "0.png").rename(misfiled[1])
    before = fingerprint(folder)
    result = cli("audit", "--images", folder, "--checkpoint", trained[0] / "lenet5_mnist.pt", *QUICK,
                 "--out-dir", tmp_path / "audit")  # fmt: skip
    found = audit_json(tmp_path / "audit")
    assert result.code == 0 and fingerprint(folder) == before
    assert {entry["file"] for entry in found["suspects"][:4]} >= {str(path) for path in misfiled}
    assert f"mv -i {misfiled[0]} {folder / '3'}/" in result.log
    tuned = cli("finetune", "--images", folder, "--checkpoint", trained[0] / "lenet5_mnist.pt", "--steps", 2,
                "--exclude", tmp_path / "audit" / "audit.json", "--data-dir", synthetic_data, *QUICK,
                "--out-dir", tmp_path / "tuned")  # fmt: skip
    assert f"Left out {len(found['suspects'])} of your images that" in tuned.log


# --- bad input: one line, exit 2, nothing written ------------------------------------------------


def refused(cli, tmp_path, *flags):
    result = cli("audit", *flags, *QUICK, "--out-dir", tmp_path / "audit")
    assert result.code == 2 and len(result.errors()) == 1 and not (tmp_path / "audit").exists()
    return result.errors()[0]


def test_one_fold_is_refused(tmp_path, cli):
    assert "--folds 1: " in refused(cli, tmp_path, "--split", "train", "--folds", 1)


def test_a_folder_without_class_sub_folders_is_refused(trained, tmp_path, cli):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    error = refused(cli, tmp_path, "--images", tmp_path / "flat", "--checkpoint", trained[0] / "lenet5_mnist.pt")
    assert "has no class sub-folders" in error


def test_a_class_the_model_does_not_know_is_refused(trained, tmp_path, cli):
    folder = labelled_folder(tmp_path / "mine", per_class=1)
    (folder / "eleven").mkdir()
    error = refused(cli, tmp_path, "--images", folder, "--checkpoint", trained[0] / "lenet5_mnist.pt")
    assert "eleven/ is not a class the model knows" in error


def test_a_split_of_another_dataset_than_the_models_is_refused(trained, tmp_path, cli):
    error = refused(
        cli, tmp_path, "--split", "test", "--dataset", "fashion-mnist", "--checkpoint", trained[0] / "lenet5_mnist.pt"
    )
    assert "was trained on mnist" in error


def test_a_model_that_learned_the_training_split_may_not_audit_it(trained, tmp_path, cli):
    error = refused(cli, tmp_path, "--split", "train", "--checkpoint", trained[0] / "lenet5_mnist.pt")
    assert "has learned the labels it would check" in error


def test_a_model_fine_tuned_on_the_folder_may_not_audit_it(trained, tmp_path, cli):
    folder = labelled_folder(tmp_path / "mine", per_class=1)
    payload = torch.load(trained[0] / "lenet5_mnist.pt", weights_only=True)
    payload["fine_tuned"] = {"from": "outputs/lenet5_mnist.pt", "images": str(folder)}
    torch.save(payload, tmp_path / "tuned.pt")
    error = refused(cli, tmp_path, "--images", folder, "--checkpoint", tmp_path / "tuned.pt")
    assert "was fine-tuned on" in error and "outputs/lenet5_mnist.pt" in error


def test_each_training_image_is_read_by_the_fold_that_held_it_out_at_its_temperature():
    results = [
        {"held_out": torch.tensor([0, 2]), "train": torch.tensor([[2.0, 0.0], [0.0, 2.0]]), "temperature": 2.0},
        {"held_out": torch.tensor([1]), "train": torch.tensor([[0.0, 1.0]]), "temperature": 0.5},
    ]
    probabilities = audit.held_out_probabilities(results, 3, 2)
    expected = torch.softmax(torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 1.0]]), 1)
    torch.testing.assert_close(probabilities, expected)


# --- the suspects, from labels and probabilities --------------------------------------------------


def test_suspects_are_the_misread_labels_weakest_first():
    labels = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    probabilities = torch.full((9, 3), 0.05)
    for image, label in enumerate(labels):
        probabilities[image, label] = 0.9
    # Ranked by the probability of the label, not by its margin, which would put 1 first.
    probabilities[1] = torch.tensor([0.10, 0.90, 0.0])  # a sure 1 labelled 0
    probabilities[7] = torch.tensor([0.50, 0.45, 0.05])  # read as 0 or 1, labelled 2
    probabilities = suspects.as_rows_of_one(probabilities)
    ranked, scores, confident = suspects.find_suspects(labels, probabilities)
    assert ranked == [7, 1] and scores[7] < scores[1]
    entries = suspects.suspect_entries(ranked, scores, confident, labels, probabilities, lambda i: {"index": i})
    assert [(entry["index"], entry["given"], entry["suggested"]) for entry in entries] == [(7, 2, 0), (1, 0, 1)]
    assert suspects.confusions(entries, labels, 3)[2] == {
        "class": 2,
        "images": 3,
        "suspects": 1,
        "suggested": [1, 0, 0],
    }
