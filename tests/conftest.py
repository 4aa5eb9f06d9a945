"""Shared fixtures: a small synthetic MNIST in the IDX format, and a way to run the real CLI.

The synthetic digits are drawn with Pillow's built-in font, jittered in size, position and
angle, so the tests need neither the network nor a copy of MNIST.
"""
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "mnist_recognition.py"
TRAIN_COUNT, TEST_COUNT = 1200, 300


def draw_digit(digit, rng, size=28, ink=255, paper=0, mode="L"):
    """One digit drawn with Pillow, jittered: like a (very tidy) handwritten digit."""
    font = ImageFont.load_default(size=rng.uniform(0.6, 0.8) * size)
    image = Image.new(mode, (size, size), paper)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = draw.textbbox((0, 0), str(digit), font=font)
    x = (size - (right - left)) / 2 - left + rng.uniform(-0.08, 0.08) * size
    y = (size - (bottom - top)) / 2 - top + rng.uniform(-0.08, 0.08) * size
    draw.text((x, y), str(digit), fill=ink, font=font, stroke_width=max(1, size // 28))
    return image.rotate(rng.uniform(-12, 12), fillcolor=paper)


def write_idx_images(path, images):
    with open(path, "wb") as file:
        file.write(struct.pack(">IIII", 0x803, len(images), 28, 28))
        file.write(np.stack([np.asarray(image, dtype=np.uint8) for image in images]).tobytes())


def write_idx_labels(path, labels):
    with open(path, "wb") as file:
        file.write(struct.pack(">II", 0x801, len(labels)))
        file.write(bytes(labels))


def write_synthetic_mnist(data_dir, seed=0):
    rng = random.Random(seed)
    raw = Path(data_dir) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", TRAIN_COUNT), ("t10k", TEST_COUNT)):
        labels = [index % 10 for index in range(count)]
        rng.shuffle(labels)
        write_idx_images(raw / f"{prefix}-images-idx3-ubyte", [draw_digit(label, rng) for label in labels])
        write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return Path(data_dir)


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """A data folder holding a small synthetic MNIST (1200 training and 300 test digits)."""
    return write_synthetic_mnist(tmp_path_factory.mktemp("synthetic") / "data")


def run_cli(*args, cwd=None, timeout=300, env=None):
    """Run mnist_recognition.py in a fresh process; returns the CompletedProcess."""
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


QUICK = ("--epochs", 2, "--batch-size", 32, "--no-download")


def trained_weights(out_dir):
    """The state_dict of the model a run wrote into out_dir."""
    return torch.load(Path(out_dir) / "lenet5_mnist.pt", weights_only=True)["model"]


@pytest.fixture(scope="session")
def trained(tmp_path_factory, synthetic_data):
    """One quick training run on the synthetic data: (out_dir, completed process)."""
    out_dir = tmp_path_factory.mktemp("trained")
    result = run_cli(*QUICK, "--epochs", 4, "--data-dir", synthetic_data, "--out-dir", out_dir)
    assert result.returncode == 0, result.stderr
    return out_dir, result


class Background:
    """The CLI running in the background, with its log read line by line."""

    def __init__(self, args, command=None):
        self.process = subprocess.Popen(command or [sys.executable, str(SCRIPT), *map(str, args)],
                                        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                        start_new_session=True)
        self.log = []

    def wait_for_line(self, text, timeout=120):
        deadline = time.monotonic() + timeout
        for line in self.process.stderr:
            self.log.append(line)
            if text in line:
                return line
            assert time.monotonic() < deadline, f"no line with {text!r} in time:\n{''.join(self.log)}"
        raise AssertionError(f"the process ended without logging {text!r}:\n{''.join(self.log)}")

    def finish(self, timeout=120):
        _, rest = self.process.communicate(timeout=timeout)
        self.log.append(rest)
        return self.process.returncode, "".join(self.log)

    def kill(self, sig=signal.SIGKILL):
        self.process.send_signal(sig)


@pytest.fixture
def background():
    started = []

    def start(*args, command=None):
        started.append(Background(args, command))
        return started[-1]

    yield start
    for job in started:
        if job.process.poll() is None:
            os.killpg(job.process.pid, signal.SIGKILL)
            job.process.wait()
