"""A dataset's four IDX files, made ready: found extracted, or extracted from their .gz after
checking its MD5 sum, or fetched by torchvision. Once they are there, mnist_recognition.py reads
them itself; torchvision is imported only here, where files must be checked, extracted or fetched.
"""

import os
import socket
import tempfile
from pathlib import Path

from loguru import logger


def prepare_files(data_dir, dataset, allow_download):
    """Make sure the four extracted IDX files exist, using local .gz files before the network."""
    try:
        if Path(data_dir).exists() and not Path(data_dir).is_dir():
            raise trainer.CliError(f"The data folder {data_dir} is not a folder.")
        if not trainer.has_files(data_dir, dataset):  # read_idx_file checks each one as it reads it
            find_or_fetch(data_dir, dataset, allow_download)
    except OSError as error:
        folder = trainer.raw_dir(data_dir, dataset)
        raise trainer.CliError(
            f"Cannot use the data folder {folder} ({error.filename or folder}: {error.strerror or error}). Make it "
            f"readable, and writable where .gz files are to be extracted there, extract them yourself (gunzip -k "
            f"{folder}/*.gz), or give another --data-dir."
        ) from None


def find_or_fetch(data_dir, dataset, allow_download):
    """Extract the missing IDX files from their .gz beside them, after checking its MD5 sum; fetch those
    that are not there at all."""
    from torchvision.datasets.utils import check_integrity

    folder, missing = trainer.raw_dir(data_dir, dataset), []
    for archive_name, md5 in dataset.torchvision_class().resources:
        archive, extracted = folder / archive_name, folder / archive_name.removesuffix(".gz")
        if extracted.is_file():
            continue
        if not archive.is_file():
            missing.append(archive_name)
        elif check_integrity(str(archive), md5):
            extract_gz(archive, extracted)
        else:
            raise trainer.CliError(
                f"{archive}: its MD5 checksum is not the official {md5}; the file is "
                f"truncated, damaged or not the original. Replace it; it was left as it is."
            )
    if missing and not allow_download:
        reason = f"{', '.join(missing)} missing and --no-download given"
        raise trainer.CliError(missing_data_message(data_dir, dataset, reason))
    if missing:
        download(data_dir, dataset, missing)


def extract_gz(archive, target):
    """Extract next to the archive, then rename, so that a killed run leaves no half file."""
    from torchvision.datasets.utils import extract_archive

    with tempfile.TemporaryDirectory(dir=archive.parent) as scratch:
        extract_archive(str(archive), scratch)
        os.replace(Path(scratch) / target.name, target)


def download(data_dir, dataset, missing):
    logger.info("Downloading {} into {}", ", ".join(missing), trainer.raw_dir(data_dir, dataset))
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # a silent network should fail, not hang
    try:
        dataset.torchvision_class()(str(data_dir), train=True, download=True)
    except Exception as error:  # torchvision reports mirror, HTTP and socket failures in many types
        last_line = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise trainer.CliError(missing_data_message(data_dir, dataset, f"the download failed ({last_line})")) from None
    finally:
        socket.setdefaulttimeout(previous_timeout)


def missing_data_message(data_dir, dataset, reason):
    names = ", ".join(f"{name}.gz" for name in trainer.IDX_FILES)
    return (
        f"{dataset.title} is not available: {reason}. Put the four files {names} "
        f"(or their extracted versions without .gz) into {trainer.raw_dir(data_dir, dataset)}/ and run again."
    )


# Last: mnist_recognition.py imports this module at its top, so importing it first runs the
# script's top, which imports this module back; by now everything it takes from here is defined.
import mnist_recognition as trainer  # noqa: E402
