"""companions/training/exclusions.py: what --exclude names, from an audit.json or a list of indices, and
the training images left without them."""

import json

import pytest
import torch

from companions.training import exclusions
from companions.training.datasets import DATASETS
from companions.training.errors import CliError

MNIST = DATASETS["mnist"]


def written(path, content):
    path.write_text(json.dumps(content))
    return path


def test_a_list_names_training_indices(tmp_path):
    assert exclusions.training_indices(written(tmp_path / "fold.json", [7, 2, 7]), MNIST) == [2, 7]


def test_an_audit_of_the_training_split_names_its_suspects(tmp_path):
    audit = {"dataset": "mnist", "split": "train", "suspects": [{"index": 9}, {"index": 4}]}
    assert exclusions.training_indices(written(tmp_path / "audit.json", audit), MNIST) == [4, 9]


def test_an_audit_of_a_folder_names_files(tmp_path):
    audit = {"dataset": "mnist", "split": "images", "suspects": [{"file": str(tmp_path / "3" / "1.png")}]}
    indices, named, audited = exclusions.read_exclusions(written(tmp_path / "audit.json", audit))
    assert (indices, named, audited) == ([], {(tmp_path / "3" / "1.png").resolve()}, ("mnist", "images"))


@pytest.mark.parametrize(
    "content, says",
    [
        ({"dataset": "mnist", "split": "test", "suspects": []}, "audits the test images, not the training split"),
        ({"dataset": "fashion-mnist", "split": "train", "suspects": []}, "audits fashion-mnist, not mnist"),
        ({"suspects": "all"}, "holds no list of suspects"),
        ([1, -2], "whole numbers from 0"),
        ([1.5], "whole numbers from 0"),
    ],
)
def test_what_training_cannot_leave_out_is_refused_naming_why(content, says, tmp_path):
    with pytest.raises(CliError, match=says):
        exclusions.training_indices(written(tmp_path / "exclude.json", content), MNIST)


def test_a_file_that_is_missing_or_not_json_is_refused(tmp_path):
    with pytest.raises(CliError, match="cannot be read"):
        exclusions.read_exclusions(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(CliError, match="not JSON"):
        exclusions.read_exclusions(tmp_path / "bad.json")


def test_kept_drops_the_indices_inside_the_split_only():
    images, labels = torch.arange(5.0).reshape(5, 1, 1, 1), torch.arange(5)
    kept_images, kept_labels = exclusions.kept((images, labels), [1, 3, 12])
    assert kept_labels.tolist() == [0, 2, 4] and kept_images.flatten().tolist() == [0.0, 2.0, 4.0]


def test_finetune_may_leave_out_a_folders_suspects_but_not_the_test_splits(tmp_path):
    folder_audit = {"dataset": "mnist", "split": "images", "suspects": [{"file": str(tmp_path / "1.png")}]}
    indices, named = exclusions.exclusions_for(written(tmp_path / "a.json", folder_audit), MNIST, ("train", "images"))
    assert (indices, named) == ([], {(tmp_path / "1.png").resolve()})
    test_audit = {"dataset": "mnist", "split": "test", "suspects": [{"index": 3}]}
    with pytest.raises(CliError, match="audits the test images, not the training split or your images"):
        exclusions.exclusions_for(written(tmp_path / "b.json", test_audit), MNIST, ("train", "images"))
