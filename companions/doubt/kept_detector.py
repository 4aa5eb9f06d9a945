"""The "not a digit" detector, learned once per dataset and kept beside the dataset's files:
<data-dir>/<folder>/not_a_digit-<key>.pt, the key made of the dataset and the detector's recipe
(companions/doubt/detector.py's RECIPE), so that changing either learns a new one.

The first command that needs it learns it; every later one loads it. Two processes that need it at
once take turns under a lock beside it: the first learns and writes it (atomically), the second
then loads what the first wrote. A kept file that cannot be read, or was learned for another
dataset, recipe or set of training files, is refused in one line and learned again; one is never
used silently. A model file carries its own copy of the detector, so it stands alone without this one.
"""

import hashlib
import json
import math
import time

import torch
from filelock import FileLock
from loguru import logger

from companions.doubt.detector import RECIPE, Detector, threshold_for, train_detector
from companions.training.dataset_files import TRAIN_FILES, raw_dir, raw_split
from companions.training.errors import CliError
from companions.training.files import first_line, os_reason, write_atomically

KEPT_FORMAT = 1
LOCK_TIMEOUT_SECONDS = 3600  # the longest a process waits for another that is learning the detector


def recipe_key(dataset):
    """A short digest of the dataset's name and the detector's recipe: the kept file's name."""
    described = json.dumps({"dataset": dataset.name, **RECIPE}, sort_keys=True)
    return hashlib.sha256(described.encode()).hexdigest()[:12]


def saved_recipe():
    """RECIPE as a kept file holds it (its widths a list, as they load back)."""
    return {**RECIPE, "widths": list(RECIPE["widths"])}


def kept_path(data_dir, dataset):
    return raw_dir(data_dir, dataset).parent / f"not_a_digit-{recipe_key(dataset)}.pt"


def training_files_digest(data_dir, dataset):
    """A digest of the training split's two files: a detector is kept for exactly the files it learned from."""
    digest = hashlib.blake2b(digest_size=16)
    for name in TRAIN_FILES:
        with open(raw_dir(data_dir, dataset) / name, "rb") as file:
            digest.update(file.read())
    return digest.hexdigest()


def detector_for(data_dir, dataset, device):
    """(the dataset's detector on `device`, the score above which it says "not a digit"): the kept one,
    or learned now and kept for every later command."""
    path, digest = kept_path(data_dir, dataset), training_files_digest(data_dir, dataset)
    if path.exists():
        kept = loaded(path, dataset, digest, device)
        if kept is not None:
            return kept
    try:
        lock = FileLock(path.with_name(path.name + ".lock"), timeout=LOCK_TIMEOUT_SECONDS)
        with lock:
            # Another process may have learned it while this one waited for the lock.
            kept = loaded(path, dataset, digest, device, quiet=True) if path.exists() else None
            return kept or learned_and_kept(path, data_dir, dataset, digest, device)
    except OSError as error:  # a read-only data folder: learned for this run alone
        logger.warning(
            "Cannot keep the '{}' detector in {} ({}): it is learned for this run alone.",
            dataset.not_of_kind,
            path.parent,
            os_reason(error),
        )
        return learned(data_dir, dataset, device)[:2]


def loaded(path, dataset, digest, device, quiet=False):
    """The kept (detector, threshold) at `path`, or None (said in one line) where it is damaged or of
    another dataset, recipe or set of training files."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        reason = mismatch(payload, dataset, digest)
        if reason is None:
            detector = Detector.from_state(payload["detector"]).to(device).eval()
            return detector, float(payload["not_a_digit_above"])
    except Exception as error:  # a damaged or foreign file fails in many ways; none runs code
        reason = first_line(error)
    if not quiet:
        logger.warning("{}: refused ({}); the '{}' detector is learned again.", path, reason, dataset.not_of_kind)
    return None


def mismatch(payload, dataset, digest):
    """Why a kept file's contents are not this dataset's detector, or None where they are."""
    if not isinstance(payload, dict) or payload.get("format") != KEPT_FORMAT:
        return "not a kept detector of this program"
    if payload.get("dataset") != dataset.name:
        return f"learned for {payload.get('dataset')}, not {dataset.name}"
    if payload.get("recipe") != saved_recipe():
        return "learned with another recipe"
    if payload.get("training_files") != digest:
        return "learned from other training files than those in the folder now"
    if not isinstance(payload.get("detector"), dict) or not math.isfinite(payload.get("not_a_digit_above", math.nan)):
        return "its weights or threshold are missing"
    return None


def learned(data_dir, dataset, device):
    """(detector, threshold, seconds) learned from the dataset's whole training split on `device`."""
    started = time.perf_counter()
    pixels, labels = raw_split(data_dir, dataset, True)
    images = pixels.float().div(255).unsqueeze(1).sub(dataset.mean).div(dataset.std).to(device)
    detector, held_out_scores = train_detector(images, labels.to(device), dataset)
    return detector, threshold_for(held_out_scores), time.perf_counter() - started


def learned_and_kept(path, data_dir, dataset, digest, device):
    logger.info(
        "Learning the '{}' detector for {} once: later commands on this dataset reuse it from {}",
        dataset.not_of_kind,
        dataset.title,
        path,
    )
    detector, threshold, seconds = learned(data_dir, dataset, device)
    payload = {
        "format": KEPT_FORMAT,
        "dataset": dataset.name,
        "recipe": saved_recipe(),
        "training_files": digest,
        "detector": {name: tensor.cpu() for name, tensor in detector.state_dict().items()},
        "not_a_digit_above": threshold,
    }
    try:
        write_atomically(path, lambda file: torch.save(payload, file))
    except CliError as error:
        logger.warning("{} The detector, learned in {:.1f} s, is for this run alone.", error, seconds)
    else:
        logger.info("Learned the '{}' detector in {:.1f} s and kept it in {}", dataset.not_of_kind, seconds, path)
    return detector, threshold
