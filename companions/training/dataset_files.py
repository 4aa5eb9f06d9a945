"""A dataset's four IDX files: made ready (found extracted, or extracted from their .gz after
checking its MD5 sum, or fetched by torchvision), then read, each checked against its header.
torchvision is imported only where files must be checked, extracted or fetched: importing it takes
longer than reading them.
"""

import math
import os
import socket
import struct
import tempfile
from pathlib import Path

import torch
from loguru import logger

from companions.training.errors import CliError
from companions.training.files import os_reason

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
TRAIN_FILES, TEST_FILES = IDX_FILES[:2], IDX_FILES[2:]


def raw_dir(data_dir, dataset):
    return Path(data_dir) / dataset.folder / "raw"


def has_files(data_dir, dataset, names=IDX_FILES):
    """Whether the extracted IDX files `names` are all in the dataset's folder."""
    return all((raw_dir(data_dir, dataset) / name).is_file() for name in names)


def prepare_files(data_dir, dataset, allow_download):
    """Make sure the four extracted IDX files exist, using local .gz files before the network."""
    try:
        if Path(data_dir).exists() and not Path(data_dir).is_dir():
            raise CliError(f"The data folder {data_dir} is not a folder.")
        if not has_files(data_dir, dataset):  # read_idx_file checks each one as it reads it
            find_or_fetch(data_dir, dataset, allow_download)
    except OSError as error:
        folder = raw_dir(data_dir, dataset)
        raise CliError(
            f"Cannot use the data folder {folder} ({error.filename or folder}: {os_reason(error)}). Make it "
            f"readable, and writable where .gz files are to be extracted there, extract them yourself (gunzip -k "
            f"{folder}/*.gz), or give another --data-dir."
        ) from None


def find_or_fetch(data_dir, dataset, allow_download):
    """Extract the missing IDX files from their .gz beside them, after checking its MD5 sum; fetch those
    that are not there at all."""
    from torchvision.datasets.utils import check_integrity

    folder, missing = raw_dir(data_dir, dataset), []
    for archive_name, md5 in dataset.torchvision_class().resources:
        archive, extracted = folder / archive_name, folder / archive_name.removesuffix(".gz")
        if extracted.is_file():
            continue
        if not archive.is_file():
            missing.append(archive_name)
        elif check_integrity(str(archive), md5):
            extract_gz(archive, extracted)
        else:
            raise CliError(
                f"{archive}: its MD5 checksum is not the official {md5}; the file is "
                f"truncated, damaged or not the original. Replace it; it was left as it is."
            )
    if missing and not allow_download:
        reason = f"{', '.join(missing)} missing and --no-download given"
        raise CliError(missing_data_message(data_dir, dataset, reason))
    if missing:
        download(data_dir, dataset, missing)


def extract_gz(archive, target):
    """Extract next to the archive, then rename, so that a killed run leaves no half file."""
    from torchvision.datasets.utils import extract_archive

    with tempfile.TemporaryDirectory(dir=archive.parent) as scratch:
        extract_archive(str(archive), scratch)
        os.replace(Path(scratch) / target.name, target)


def download(data_dir, dataset, missing):
    logger.info("Downloading {} into {}", ", ".join(missing), raw_dir(data_dir, dataset))
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # a silent network should fail, not hang
    try:
        dataset.torchvision_class()(str(data_dir), train=True, download=True)
    except Exception as error:  # torchvision reports mirror, HTTP and socket failures in many types
        last_line = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise CliError(missing_data_message(data_dir, dataset, f"the download failed ({last_line})")) from None
    finally:
        socket.setdefaulttimeout(previous_timeout)


def missing_data_message(data_dir, dataset, reason):
    names = ", ".join(f"{name}.gz" for name in IDX_FILES)
    return (
        f"{dataset.title} is not available: {reason}. Put the four files {names} "
        f"(or their extracted versions without .gz) into {raw_dir(data_dir, dataset)}/ and run again."
    )


# Reading them: each split as torchvision has it, checked against the files' headers


def read_idx_file(path, magic, item_shape):
    """The items of an IDX file (MNIST's format: a big-endian header, then unsigned bytes) as a
    uint8 tensor, after checking the header against the file's size; a damaged file gets a message
    that says which file is wrong and how. (As torchvision reads them; importing it takes longer.)"""
    header_size = 4 * (2 + len(item_shape))
    try:
        with open(path, "rb") as file:
            header = file.read(header_size)
            body = bytearray(file.read())  # writable, as torch.frombuffer wants
    except OSError as error:
        raise CliError(f"{path}: cannot be read ({error.strerror}).") from None
    file_size = len(header) + len(body)
    if len(header) < header_size:
        raise CliError(f"{path}: only {len(header)} bytes, too short to be an IDX file.")
    found_magic, count, *shape = struct.unpack(f">{2 + len(item_shape)}I", header)
    if found_magic != magic:
        raise CliError(
            f"{path}: wrong magic number {found_magic:#010x}, expected {magic:#010x}; "
            f"this is not an IDX {'image' if item_shape else 'label'} file."
        )
    if tuple(shape) != item_shape:
        raise CliError(f"{path}: images are {'x'.join(map(str, shape))} pixels, expected 28x28.")
    expected_size = header_size + count * math.prod(item_shape)
    if file_size != expected_size:
        raise CliError(
            f"{path}: {file_size} bytes, but its header announces {count} items, which "
            f"take {expected_size} bytes; the file is truncated or damaged."
        )
    return torch.frombuffer(body, dtype=torch.uint8).view(count, *item_shape)


def raw_split(data_dir, dataset, train):
    """As its files hold it: (images N x 28 x 28 uint8, labels N int64), as torchvision has them."""
    prefix = raw_dir(data_dir, dataset) / ("train" if train else "t10k")
    images = read_idx_file(Path(f"{prefix}-images-idx3-ubyte"), 0x803, (28, 28))
    labels = read_idx_file(Path(f"{prefix}-labels-idx1-ubyte"), 0x801, ())
    if len(images) != len(labels):
        raise CliError(
            f"{prefix}-labels-idx1-ubyte: {len(labels)} labels for the {len(images)} images in "
            f"{Path(prefix).name}-images-idx3-ubyte."
        )
    return images, labels.long()
