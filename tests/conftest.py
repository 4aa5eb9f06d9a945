"""Shared fixtures: a small synthetic MNIST in the IDX format, ways to run the command line, the
real datasets where they are present, and a headless browser.

The synthetic digits are drawn with Pillow's built-in font, jittered in size, position and
angle, so the tests need neither the network nor a copy of MNIST. Most tests run the command
line in-process through `main(argv)`; only tests about the process itself (signals, torchrun,
one end-to-end run) start `python mnist_recognition.py`.

A test that needs the real data or Chromium skips, saying why, where they are missing; with
REQUIRE_ALL_TESTS=1 in the environment (CI sets it) it fails instead, so that CI cannot go green
by skipping them.
"""

import builtins
import errno
import io
import os
import queue
import random
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

import mnist_recognition as app

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "mnist_recognition.py"
TRAIN_COUNT, TEST_COUNT = 1200, 300
# Tests about training pin the CPU: they compare numbers that only the CPU path keeps bit-exact. Most
# look at the model, the log or metrics.json, not at the figures, which take most of a quick run.
QUICK_WITH_FIGURES = ("--epochs", 2, "--batch-size", 32, "--no-download", "--device", "cpu")
QUICK = (*QUICK_WITH_FIGURES, "--no-figures")


# Each LeNet-5 layer's output for one image, as the original report draws them.
LENET5_LAYER_SHAPES = {
    "conv1": [6, 28, 28],
    "pool1": [6, 14, 14],
    "conv2": [16, 10, 10],
    "pool2": [16, 5, 5],
    "fc1": [120],
    "fc2": [84],
    "fc3": [10],
}

# Each recipe as the README and --help promise it, written out once for every test that checks one (as
# metrics.json records them): a typo in the script's RECIPES table must fail a test.
PROMISED_RECIPES = {
    "original": {
        "epochs": 10,
        "batch_size": 64,
        "lr": 0.001,
        "schedule": "constant",
        "warmup": 0.25,
        "adam_betas": [0.9, 0.999],
        "label_smoothing": 0.0,
        "augment": "none",
    },
    "fast": {
        "epochs": 1,
        "batch_size": 128,
        "lr": 0.015,
        "schedule": "onecycle",
        "warmup": 0.35,
        "adam_betas": [0.7, 0.9],
        "label_smoothing": 0.1,
        "augment": "none",
    },
    "best": {
        "epochs": 30,
        "batch_size": 128,
        "lr": 0.003,
        "schedule": "onecycle",
        "warmup": 0.25,
        "adam_betas": [0.9, 0.999],
        "label_smoothing": 0.1,
        "augment": "affine,elastic,thickness",
    },
}


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


def paper_digit(digit, seed=0, size=300, **kwargs):
    """A dark digit on light paper, like a photo or scan of handwriting."""
    return draw_digit(
        digit, random.Random(seed), size=size, ink=kwargs.pop("ink", 0), paper=kwargs.pop("paper", 255), **kwargs
    )


def off_centre(image, canvas=(640, 480), at=(60, 150), paper=255):
    page = Image.new(image.mode, canvas, paper)
    page.paste(image, at)
    return page


def digits_side_by_side(digits, tile=120, seed=0):
    """Dark digits on white, each drawn in its own square tile, the tiles side by side: a number
    with clear gaps."""
    image = Image.new("L", (tile * len(digits) + 40, tile + 40), 255)
    for index, digit in enumerate(digits):
        drawn = draw_digit(digit, random.Random(seed + index), size=tile, ink=0, paper=255)
        image.paste(drawn, (20 + tile * index, 20))
    return image


def huge_png(path):
    """A valid PNG whose header claims 100000 x 100000 pixels: a decompression bomb."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", 100_000, 100_000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def labelled_folder(folder, per_class=6, seed=0, classes=range(10)):
    """Photos of drawn digits, dark on light, in one sub-folder per class."""
    rng = random.Random(seed)
    for digit in classes:
        (folder / str(digit)).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            draw_digit(digit, rng, size=28, ink=0, paper=255).resize((112, 112)).save(
                folder / str(digit) / f"{index}.png"
            )
    return folder


def write_idx_images(path, images):
    with open(path, "wb") as file:
        file.write(struct.pack(">IIII", 0x803, len(images), 28, 28))
        file.write(np.stack([np.asarray(image, dtype=np.uint8) for image in images]).tobytes())


def write_idx_labels(path, labels):
    with open(path, "wb") as file:
        file.write(struct.pack(">II", 0x801, len(labels)))
        file.write(bytes(labels))


def write_synthetic_mnist(data_dir, seed=0, folder="MNIST"):
    """Synthetic IDX files in <data_dir>/<folder>/raw/, as torchvision lays out MNIST and its kin."""
    rng = random.Random(seed)
    raw = Path(data_dir) / folder / "raw"
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


# --- what a test needs from the machine: skipped where it is missing, unless CI requires it -------


def skip_unless_required(reason):
    """Skip the calling test, saying why; under REQUIRE_ALL_TESTS=1 fail it instead."""
    if os.environ.get("REQUIRE_ALL_TESTS") == "1":
        pytest.fail(f"{reason}; REQUIRE_ALL_TESTS=1 is set, so this test may not skip", pytrace=False)
    pytest.skip(reason)


# The four files of a dataset in MNIST's format, written out here rather than taken from the
# script, so that a wrong name there cannot hide.
DATASET_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def real_dataset_folder(shared_name, torchvision_folder):
    """A folder holding a real dataset's four files (extracted or .gz): data/<torchvision_folder>/raw/
    or ../shared/<shared_name>/. Skips the test (or fails it, under REQUIRE_ALL_TESTS=1) without one."""
    for folder in (REPO / "data" / torchvision_folder / "raw", REPO.parent / "shared" / shared_name):
        if all((folder / name).is_file() or (folder / f"{name}.gz").is_file() for name in DATASET_FILES):
            return folder
    skip_unless_required(f"the real files were not found in data/{torchvision_folder}/raw/ or ../shared/{shared_name}/")


@pytest.fixture(scope="session")
def real_mnist(tmp_path_factory):
    """A data folder holding the real MNIST, shared by a session's tests as a user's data/ is shared by
    their runs: the first that needs the "not a digit" detector learns it, the rest reuse it."""
    data_dir = tmp_path_factory.mktemp("real") / "data"
    shutil.copytree(real_dataset_folder("mnist", "MNIST"), data_dir / "MNIST" / "raw")
    return data_dir  # the first test to train on it learns the detector: minutes, within pytest.ini's timeout


@pytest.fixture(scope="session")
def real_fast(real_mnist, tmp_path_factory):
    """A model of the `fast` recipe trained on the real MNIST, as `bash run.sh --recipe fast` trains it:
    shared by the tests that need a model that reads real handwriting. Returns its output folder."""
    out_dir = tmp_path_factory.mktemp("real_fast")
    flags = ("--recipe", "fast", "--no-download", "--device", "cpu", "--no-figures")
    train_quietly(*flags, "--data-dir", real_mnist, "--out-dir", out_dir)
    return out_dir


@pytest.fixture(scope="session")
def chromium(tmp_path_factory):
    """Headless Chromium driven through Selenium and Debian's chromium-driver, started once a session."""
    binary, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and chromedriver):
        skip_unless_required("Chromium and its driver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
        "--window-size=1100,900",
    ):
        options.add_argument(flag)
    # Every request the page makes, and what its scripts say (an error that stops one, say).
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture
def browser(chromium):
    """The session's browser, as a fresh one: a blank page, the network on, no requests logged yet."""
    chromium.get("about:blank")
    chromium.set_network_conditions(offline=False, latency=0, download_throughput=-1, upload_throughput=-1)
    chromium.get_log("performance")
    chromium.get_log("browser")
    return chromium


# --- a file system that says no --------------------------------------------------------------------


class RefusingFiles:
    """This process's file operations under chosen folders fail as the operating system fails them:
    writes into a read-only folder or onto a full disk, reads of an unreadable folder. The tests run
    as root, whom chmod does not stop, so the refusal is made here, at the os and open functions
    that every writer and reader in the program goes through."""

    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def __init__(self, monkeypatch):
        self.refused = []  # (folder, "write" or "read", errno)
        real = {name: getattr(os, name) for name in ("open", "mkdir", "replace", "link", "listdir", "scandir")}
        real_open = builtins.open

        def checked(name, kind_of):
            def call(*args, **kwargs):
                self.check(args, kwargs, kind_of)
                return real[name](*args, **kwargs)

            return call

        monkeypatch.setattr(
            os, "open", checked("open", lambda a, k: [(a[0], "write" if a[1] & self.WRITE_FLAGS else "read")])
        )
        monkeypatch.setattr(os, "mkdir", checked("mkdir", lambda a, k: [(Path(os.fsdecode(a[0])).parent, "write")]))
        monkeypatch.setattr(os, "replace", checked("replace", lambda a, k: [(a[1], "write")]))
        monkeypatch.setattr(os, "link", checked("link", lambda a, k: [(a[1], "write")]))
        monkeypatch.setattr(os, "listdir", checked("listdir", lambda a, k: [(a[0] if a else ".", "read")]))
        monkeypatch.setattr(os, "scandir", checked("scandir", lambda a, k: [(a[0] if a else ".", "read")]))

        def opened(file, mode="r", *args, **kwargs):
            self.check((file,), {}, lambda a, k: [(file, "write" if set(mode) & set("wax+") else "read")])
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", opened)
        monkeypatch.setattr(io, "open", opened)

    def check(self, args, kwargs, kind_of):
        for path, kind in kind_of(args, kwargs):
            if isinstance(path, int):
                continue  # a file descriptor: opened, and checked, already
            where = Path(os.fsdecode(path)).absolute()
            for folder, refused_kind, code in self.refused:
                if where.is_relative_to(folder) and (kind == refused_kind or refused_kind == "read"):
                    raise OSError(code, os.strerror(code), str(where))

    def read_only(self, folder):
        self.refused.append((Path(folder).absolute(), "write", errno.EACCES))

    def full(self, folder):
        self.refused.append((Path(folder).absolute(), "write", errno.ENOSPC))

    def unreadable(self, folder):
        self.refused.append((Path(folder).absolute(), "read", errno.EACCES))


@pytest.fixture
def refusing(monkeypatch):
    """refusing.read_only(folder), .full(folder), .unreadable(folder): see RefusingFiles."""
    return RefusingFiles(monkeypatch)


# --- the command line, in-process ----------------------------------------------------------------


@dataclass
class Result:
    code: int  # what main() returned
    log: str  # everything logged (stderr)
    stdout: str = ""

    def errors(self):
        return [line for line in self.log.splitlines() if "| ERROR" in line]


@pytest.fixture
def cli(capsys):
    """Run main(argv) in this process; returns its exit code, log and standard output."""

    def run(*args):
        capsys.readouterr()
        code = app.main([str(arg) for arg in args])
        out, err = capsys.readouterr()
        return Result(code, err, out)

    return run


def without(monkeypatch, package):
    """Make importing `package` (or any of its modules) fail in this process, as if it were not installed."""
    for name in [package, *(name for name in sys.modules if name.startswith(package + "."))]:
        monkeypatch.setitem(sys.modules, name, None)


def train_quietly(*args):
    """main(argv) for fixtures wider than one test, which cannot use capsys; asserts success."""
    assert app.main([str(arg) for arg in args]) == 0


def interrupt_at(monkeypatch, epoch, batch):
    """Ctrl-C, in-process, right after the given batch (both counted from 1)."""
    record = app.Progress.record_batch

    def record_then_interrupt(progress, index, loss_sum, correct):
        record(progress, index, loss_sum, correct)
        if (progress.epoch + 1, index + 1) == (epoch, batch):
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(app.Progress, "record_batch", record_then_interrupt)


def trained_weights(out_dir):
    """The state_dict of the model a run wrote into out_dir."""
    return torch.load(Path(out_dir) / "lenet5_mnist.pt", weights_only=True)["model"]


def assert_same_weights(first_out_dir, second_out_dir, atol=0.0):
    """The two runs' models hold the same tensors: bit for bit, or within `atol`."""
    first, second = trained_weights(first_out_dir), trained_weights(second_out_dir)
    assert first.keys() == second.keys()
    for name, tensor in second.items():
        torch.testing.assert_close(first[name], tensor, rtol=0, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


# --- the command line as a process ---------------------------------------------------------------


def script_command(*args):
    return [sys.executable, str(SCRIPT), *map(str, args)]


def paused_command(epoch, batch, *args):
    """The script's command line, made to wait after the given batch (see paused_run.py)."""
    return [sys.executable, str(REPO / "tests" / "paused_run.py"), str(epoch), str(batch), *map(str, args)]


def torchrun_command(*args, processes=2):
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        str(SCRIPT),
        *map(str, args),
    ]


def run_process(command, timeout=120):
    """Run a command to its end; returns the CompletedProcess (text output)."""
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def interruptible():
    """Ctrl-C as a terminal delivers it: a suite started as a background job (`... &` in a script)
    ignores SIGINT, and its processes would inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Background:
    """A process running in the background, with its log read line by line by a thread, so that
    waiting for a line fails at its deadline even when the process prints nothing."""

    def __init__(self, command):
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
            preexec_fn=interruptible,
        )
        self.lines, self.log = queue.Queue(), []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stderr:
            self.lines.put(line)
        self.lines.put(None)  # the end of the output

    def _next_line(self, deadline, waiting_for):
        try:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"{waiting_for} did not come in time:\n{''.join(self.log)}") from None
        if line is not None:
            self.log.append(line)
        return line

    def wait_for_line(self, text, timeout=60):
        deadline = time.monotonic() + timeout
        while (line := self._next_line(deadline, f"a line with {text!r}")) is not None:
            if text in line:
                return line
        raise AssertionError(f"the process ended without logging {text!r}:\n{''.join(self.log)}")

    def finish(self, timeout=60):
        """Wait for the process to end; returns (exit code, whole log)."""
        deadline = time.monotonic() + timeout
        while self._next_line(deadline, "the end of the process") is not None:
            pass
        return self.process.wait(timeout=max(0.0, deadline - time.monotonic())), "".join(self.log)

    def send(self, sig):
        self.process.send_signal(sig)

    def go_on(self):
        """Let a paused run (paused_command) continue."""
        self.process.stdin.write("go on\n")
        self.process.stdin.close()


@pytest.fixture
def background():
    started = []

    def start(command):
        started.append(Background(command))
        return started[-1]

    yield start
    for job in started:
        if job.process.poll() is None:
            os.killpg(job.process.pid, signal.SIGTERM)  # torchrun passes it on to workers in other sessions
            try:
                job.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(job.process.pid, signal.SIGKILL)
                job.process.wait()


@pytest.fixture(scope="session")
def fashion_trained(tmp_path_factory):
    """A model trained on synthetic files laid out as Fashion-MNIST: (data_dir, out_dir)."""
    data_dir = tmp_path_factory.mktemp("fashion") / "data"
    write_synthetic_mnist(data_dir, folder="FashionMNIST")
    out_dir = data_dir.parent / "out"
    train_quietly(
        "--dataset",
        "fashion-mnist",
        "--epochs",
        2,
        "--batch-size",
        32,
        "--no-download",
        "--device",
        "cpu",
        "--no-figures",
        "--data-dir",
        data_dir,
        "--out-dir",
        out_dir,
    )
    return data_dir, out_dir


@pytest.fixture(scope="session")
def trained(tmp_path_factory, synthetic_data):
    """The end-to-end run: `python mnist_recognition.py` as a user starts it, on the synthetic
    data, 4 epochs. Returns (out_dir, the CompletedProcess)."""
    out_dir = tmp_path_factory.mktemp("trained")
    result = run_process(
        script_command(*QUICK_WITH_FIGURES, "--epochs", 4, "--data-dir", synthetic_data, "--out-dir", out_dir)
    )
    assert result.returncode == 0, result.stderr
    return out_dir, result
