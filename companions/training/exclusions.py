"""--exclude FILE: the images a run leaves out, as a JSON file names them. Either an audit.json
(its suspects: by index in the dataset's training split after `audit --split train`, by file after
`audit --images FOLDER`), or a plain list of training-split indices (audit writes its folds so).
"""

import json
from pathlib import Path

import torch

from companions.training.errors import CliError


def read_exclusions(path):
    """(the training-split indices, the resolved files) that `path` names; the audit.json's dataset and
    split as it records them (None for a plain list)."""
    try:
        content = json.loads(Path(path).read_bytes())
    except OSError as error:
        raise CliError(f"--exclude {path}: cannot be read ({error.strerror}). Give an audit.json.") from None
    except ValueError:
        raise CliError(f"--exclude {path}: not JSON. Give an audit.json that audit wrote.") from None
    if isinstance(content, list):
        return checked_indices(path, content), set(), None
    if not isinstance(content, dict) or not isinstance(content.get("suspects"), list):
        raise CliError(f"--exclude {path}: holds no list of suspects. Give an audit.json that audit wrote.")
    suspects = content["suspects"]
    if not all(isinstance(suspect, dict) for suspect in suspects):
        raise CliError(f"--exclude {path}: a suspect is not an object. Give an audit.json that audit wrote.")
    indices = checked_indices(path, [suspect["index"] for suspect in suspects if "index" in suspect])
    named = {Path(suspect["file"]).resolve() for suspect in suspects if "file" in suspect}
    return indices, named, (content.get("dataset"), content.get("split"))


def checked_indices(path, indices):
    if not all(isinstance(index, int) and not isinstance(index, bool) and index >= 0 for index in indices):
        raise CliError(f"--exclude {path}: its indices must be whole numbers from 0.")
    return sorted(set(indices))


LEARNED_FROM = {"train": "the training split", "images": "your images"}  # what each kind of audit names


def exclusions_for(path, dataset, learned):
    """(the training-split indices, the files) that `path` leaves out; refused where it audited another
    dataset, or images other than those the command learns from (`learned`: kinds of LEARNED_FROM)."""
    indices, named, audited = read_exclusions(path)
    if audited is None:
        return indices, named
    name, split = audited
    if name != dataset.name:
        raise CliError(f"--exclude {path}: audits {name}, not {dataset.name}. Give an audit of {dataset.name}.")
    if split not in learned:
        wanted = " or ".join(LEARNED_FROM[kind] for kind in learned)
        commands = " or ".join(f"'audit --{'split train' if kind == 'train' else 'images'}'" for kind in learned)
        raise CliError(
            f"--exclude {path}: audits the {split} images, not {wanted}; only images learned from are left out. "
            f"Give the audit.json of {commands}."
        )
    return indices, named


def training_indices(path, dataset):
    """The indices in `dataset`'s training split that `path` leaves out of training."""
    return exclusions_for(path, dataset, ("train",))[0]


def kept(split, indices):
    """(images, labels) without the images at `indices`: positions in the whole training split, of
    which this split is the start."""
    images, labels = split
    inside = torch.tensor([index for index in indices if index < len(labels)], dtype=torch.long)
    keep = torch.ones(len(labels), dtype=torch.bool).index_fill_(0, inside, False).to(labels.device)
    return images[keep], labels[keep]
