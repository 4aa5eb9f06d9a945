"""A person's own labelled images, in torchvision's ImageFolder layout: one sub-folder per class,
named by the class (`0`..`9`, or Fashion-MNIST's names with '/' as '-'), each image a file in it.

serve --collect saves into such a folder; evaluate --images and finetune read one, each image
through predict's own preparation.
"""

import errno
import io
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from companions.training.files import os_reason
from companions.using.prepare import ImageError, open_grayscale, read_image

NUMBERED = re.compile(r"(\d+)\.png")


def folder_name(class_name):
    """The sub-folder of a class: its name, which a path cannot hold with '/' ('T-shirt/top': 'T-shirt-top')."""
    return class_name.replace("/", "-")


# ----------------------------------------------------------------------------------------------
# Saving one (serve --collect)
# ----------------------------------------------------------------------------------------------


class FolderNotWritable(Exception):
    """The collection folder cannot take the file: no permission, or no space left."""

    def __init__(self, message, no_space):
        super().__init__(message)
        self.no_space = no_space


SAVING = threading.Lock()  # one save at a time in this process; os.link keeps other processes apart


def save_example(root, dataset, label, body):
    """Save an image's bytes as the next number of its class: root/<class>/<number>.png, written
    whole or not at all, never over another file, and no number used twice. A PNG is kept as it
    was sent; another format is stored as PNG, pixel for pixel. Returns the path; raises an
    ImageError for a body that is not an image, FolderNotWritable where the disk says no."""
    open_grayscale(io.BytesIO(body))  # raises for anything that is not an image
    png = body if body.startswith(b"\x89PNG\r\n\x1a\n") else as_png(body)
    folder = Path(root) / folder_name(dataset.classes[label])
    with SAVING:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return write_next(folder, png)
        except OSError as error:
            no_space = error.errno in (errno.ENOSPC, errno.EDQUOT)
            reason = "no space is left on its disk" if no_space else os_reason(error)
            raise FolderNotWritable(f"cannot save into {folder}: {reason}", no_space) from None


def as_png(body):
    buffer = io.BytesIO()
    with Image.open(io.BytesIO(body)) as image:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_next(folder, png):
    """Write `png` to a temporary file in `folder`, then link it to the first free number after the
    highest there: a link never replaces a file, so a number another process took is skipped."""
    temporary = folder / f".{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        with open(temporary, "wb") as file:
            file.write(png)
            file.flush()
            os.fsync(file.fileno())
        number = highest_number(folder) + 1
        while True:
            path = folder / f"{number}.png"
            try:
                os.link(temporary, path)
                return path
            except FileExistsError:
                number += 1
    finally:
        temporary.unlink(missing_ok=True)


def highest_number(folder):
    numbers = [int(match[1]) for path in folder.iterdir() if (match := NUMBERED.fullmatch(path.name))]
    return max(numbers, default=0)


def counts(root, dataset):
    """How many images each class has in the folder, by class name."""
    return {name: len(class_files(Path(root) / folder_name(name))) for name in dataset.classes}


def class_files(folder):
    """The files of a class's sub-folder that are read as its images: all but hidden ones (such as
    save_example's temporaries), in name order; none where the folder is missing."""
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if path.is_file() and not path.name.startswith("."))


# ----------------------------------------------------------------------------------------------
# Reading them all (evaluate --images, finetune)
# ----------------------------------------------------------------------------------------------


@dataclass
class LabelledImages:
    """A folder's images as the network takes them, with their labels and files."""

    inputs: torch.Tensor  # N x 1 x 28 x 28, normalised like the dataset
    labels: torch.Tensor  # N class indices
    files: list  # N paths
    problems: list = field(default_factory=list)  # one line per folder or file that could not be read

    def per_class(self, dataset):
        """The number of images of each class, by class name."""
        found = torch.bincount(self.labels, minlength=len(dataset.classes)).tolist()
        return dict(zip(dataset.classes, found))


class FolderNotReadable(Exception):
    """The folder of images cannot be listed: no permission, or it is gone."""


def read_folder(root, dataset):
    """Every image in root's class sub-folders, prepared as predict prepares one. A sub-folder
    that names no class, an empty or unreadable one, or a file that cannot be read becomes one
    line in `problems`; the rest is still read. Raises FolderNotReadable where root cannot be listed."""
    classes = {folder_name(name): index for index, name in enumerate(dataset.classes)}
    inputs, labels, files, problems = [], [], [], []
    try:
        folders = sorted(path for path in Path(root).iterdir() if path.is_dir() and not path.name.startswith("."))
    except OSError as error:
        raise FolderNotReadable(f"{root}: cannot be read ({os_reason(error)})") from None
    for folder in folders:
        if folder.name not in classes:
            expected = ", ".join(classes)
            problems.append(f"{folder}: not a class of {dataset.title} (the sub-folders are named {expected})")
            continue
        try:
            images = class_files(folder)
        except OSError as error:
            problems.append(f"{folder}: cannot be read ({os_reason(error)})")
            continue
        if not images:
            problems.append(f"{folder}: no images in it")
        for path in images:
            try:
                _, network_input = read_image(path, dataset)
            except ImageError as error:
                problems.append(f"{path}: {error}")
                continue
            inputs.append(network_input)
            labels.append(classes[folder.name])
            files.append(path)
    stacked = torch.stack(inputs) if inputs else torch.zeros(0, 1, 28, 28)
    return LabelledImages(stacked, torch.tensor(labels, dtype=torch.long), files, problems)
