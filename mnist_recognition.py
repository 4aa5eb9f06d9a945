#!/usr/bin/env python3
"""LeNet-5 on MNIST: train it, see how it learned, check it, and try it on your own handwriting.

    python mnist_recognition.py                       # the original recipe; outputs/ gets the model,
                                                      # metrics.json, six figures and report.html
    python mnist_recognition.py --recipe fast         # one pass over the data
    python mnist_recognition.py --recipe best         # augmented, 30 epochs
    python mnist_recognition.py --dataset fashion-mnist
    python mnist_recognition.py evaluate --checkpoint outputs/lenet5_mnist.pt
    python mnist_recognition.py predict my_digit.png --checkpoint outputs/lenet5_mnist.pt
    python mnist_recognition.py serve                 # a page to draw a digit on: http://127.0.0.1:8000/
    python mnist_recognition.py export                # outputs/lenet5_mnist.onnx, checked with ONNX Runtime
    torchrun --standalone --nproc_per_node=2 mnist_recognition.py

This file is the training, in the order the data flows: the settings, LeNet-5, the data, the
training loop, evaluation, the grids of images, and main. The companions/ package beside it holds
the plumbing (the command line, fetching the dataset, atomic files and safe checkpoints) and what
uses a trained model or decorates a run (evaluate, predict, serve, export, finetune, the report),
each of those imported only by the command that needs it.

Each split is loaded once into a normalised tensor on the training device, and batches are drawn
by indexing it with a seeded permutation. On one machine every run with the same flags gives the
same numbers to the last bit; training resumes bit-exactly from checkpoints, and the same script
runs under torchrun with DistributedDataParallel.
"""

import time

STARTED_AT = time.time()  # before the imports below, so that a run's timeline shows what they cost

import copy
import datetime
import hashlib
import importlib
import importlib.metadata
import math
import os
import shlex
import signal
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from loguru import logger
from torch.nn.parallel import DistributedDataParallel
from torch.optim.adam import adam
from tqdm import tqdm

if __name__ == "__main__":  # the companions `import mnist_recognition`: this module, not a second copy of it
    sys.modules.setdefault("mnist_recognition", sys.modules[__name__])

from companions.command_line import (
    Setting,
    adam_betas,
    as_text,
    augmentation_list,
    fraction,
    non_negative_int,
    parse_args,
    positive_float,
    positive_int,
)
from companions.dataset_files import prepare_files
from companions.files import (
    CHECKPOINT_FILE,
    METRICS_FILE,
    MODEL_FILE,
    REPORT_FILE,
    load_checkpoint,
    prepare_out_dir,
    save_checkpoint,
    save_model,
    write_atomically,
)

IMPORTED_AT = time.time()

# ----------------------------------------------------------------------------------------------
# Settings: every flag declared once, the recipes, the datasets
# ----------------------------------------------------------------------------------------------

EVAL_BATCH_SIZE = 1000  # evaluation needs no gradients, so large batches cost little memory
FIGURE_INCHES, FIGURE_DPI = 6, 100  # every 4x4 figure is 600x600 pixels
CHECKPOINT_FORMAT = 2  # written into every checkpoint and model file; --resume takes only this one
ONNX_TOLERANCE = 1e-5  # the largest difference in any probability that export accepts

# The figures a run writes into --out-dir beside MODEL_FILE, CHECKPOINT_FILE, METRICS_FILE and REPORT_FILE.
CURVES_PNG, CONFUSION_PNG, MISTAKES_PNG = "training_curves.png", "confusion_matrix.png", "mistakes.png"
PREDICTIONS_PNG, TRAIN_IMAGES_PNG = "predictions.png", "train_images.png"


def split_images_png(split):
    """test_images.png, or validation_images.png under --validation."""
    return f"{split}_images.png"


def training_files(split):
    """Every file a training run writes into --out-dir."""
    figures = (CURVES_PNG, CONFUSION_PNG, MISTAKES_PNG, PREDICTIONS_PNG, TRAIN_IMAGES_PNG, split_images_png(split))
    return (MODEL_FILE, CHECKPOINT_FILE, METRICS_FILE, REPORT_FILE, *figures)


COMMANDS = ("train", "evaluate", "predict", "serve", "export", "finetune")


DATA_COMMANDS = ("train", "evaluate", "finetune")  # the commands that read a dataset's files
ACCELERATORS = ("cuda", "mps", "xpu")  # what --device names besides the CPU, as torch.accelerator names them
# fmt: off
SETTINGS = (
    Setting("recipe", "original", "a named set of defaults for the settings below (see RECIPES); "
            "a flag given explicitly wins over its recipe", choices=("original", "fast", "best"), must_match=True),
    Setting("epochs", 10, "passes over the training set", positive_int),
    Setting("batch_size", 64, "training batch size (the global batch under torchrun)", positive_int,
            must_match=True),
    Setting("lr", 1e-3, "Adam learning rate (the peak rate with a schedule)", positive_float, must_match=True),
    Setting("schedule", "constant", "learning-rate schedule over all steps: constant; onecycle (warm-up "
            "from lr/25, then cosine down); cosine (linear warm-up from 0, then cosine down)",
            choices=("constant", "onecycle", "cosine"), must_match=True),
    Setting("warmup", 0.25, "the share of all steps that warms the learning rate up (onecycle, cosine)",
            fraction, must_match=True),
    Setting("adam_betas", (0.9, 0.999), "Adam's beta1,beta2", adam_betas, must_match=True),
    Setting("label_smoothing", 0.0, "cross-entropy label smoothing", fraction, must_match=True),
    Setting("augment", "none", "training-image augmentation, drawn anew for every image in every epoch: none, "
            "or a list of: affine (a random rotation, scale, shear and shift), elastic (a smooth random "
            "distortion, as of a hand), thickness (strokes made randomly thinner or wider)", augmentation_list,
            must_match=True),
    Setting("seed", 0, "seed for weights, shuffling, augmentation and the images shown in figures", int,
            commands=DATA_COMMANDS, must_match=True),
    Setting("validation", 0, "hold out the last N training images and evaluate on them instead of the "
            "test set (to choose settings without looking at the test set); 0: off", non_negative_int,
            must_match=True),
    Setting("train_limit", None, "use only the first N training images (quick runs; default: all)",
            positive_int, must_match=True),
    Setting("test_limit", None, "use only the first N test images (quick runs; default: all)",
            positive_int, commands=DATA_COMMANDS, must_match=True),
    Setting("log_interval", 200, "log loss and accuracy every N batches", positive_int),
    Setting("eval_every", 1, "evaluate on the test split (or the validation split) after every N epochs; "
            "0: only after the last", non_negative_int),
    Setting("device", "auto", "where to compute; auto picks torch's accelerator (CUDA, MPS or XPU) where there "
            "is one, else the CPU", choices=("auto", "cpu", *ACCELERATORS),
            commands=("train", "evaluate", "predict", "serve", "finetune")),
    Setting("dataset", "mnist", "mnist (handwritten digits), fashion-mnist (Zalando's clothing) or kmnist "
            "(Kuzushiji characters); the commands that read a model use the checkpoint's",
            choices=("mnist", "fashion-mnist", "kmnist"), commands=COMMANDS, must_match=True),
    Setting("data_dir", Path("data"), "folder that holds (or receives) MNIST/raw/, FashionMNIST/raw/ or "
            "KMNIST/raw/", Path, commands=(*DATA_COMMANDS, "export")),
    Setting("out_dir", Path("outputs"), "folder for figures, metrics, the model and checkpoints", Path),
    Setting("no_download", False, "never touch the network; the dataset's files must already be present",
            commands=DATA_COMMANDS, recorded=False),
    Setting("resume", False, f"continue from <out-dir>/{CHECKPOINT_FILE}; --epochs may be raised "
            "with the constant schedule", recorded=False),
)

# A recipe is the settings it changes; every other setting keeps its default above. The numbers
# were chosen on a validation split (--validation 10000), never on the test set: see the README.
RECIPES = {
    "original": {},  # the original design's recipe, bit for bit
    "fast": {"epochs": 1, "batch_size": 128, "lr": 1.5e-2, "schedule": "onecycle", "warmup": 0.35,
             "adam_betas": (0.7, 0.9), "label_smoothing": 0.1},
    "best": {"epochs": 30, "batch_size": 128, "lr": 3e-3, "schedule": "onecycle",
             "augment": "affine,elastic,thickness", "label_smoothing": 0.1},
}
# fmt: on


@dataclass(frozen=True)
class Dataset:
    """A 28x28 grayscale dataset in MNIST's format (60,000 + 10,000 images, ten classes)."""

    name: str  # its --dataset value
    title: str
    folder: str  # the name of its torchvision class, which is also its folder: <data-dir>/<folder>/raw/
    classes: tuple  # as its torchvision class names them
    # Of all training pixels scaled to 0..1: data.float().div(255).mean() and .std() of torchvision's
    # training split (population std), rounded to 4 places.
    mean: float
    std: float
    image_kind: str  # "digit" (a photo is prepared as MNIST was made) or "object" (as Fashion-MNIST was)
    augment_limits: dict  # what --augment may do to an image without changing its class
    # The 1st and 99th percentile of its training images' stroke widths, as companions/prepare.py
    # measures them; predict brings strokes outside that range to its nearer end. None: left as they are.
    stroke_widths: tuple = None

    def torchvision_class(self):
        """Its torchvision dataset class (file names, MD5 sums, mirrors), imported only when the files
        must be checked, extracted or fetched: importing torchvision takes longer than reading them."""
        return getattr(importlib.import_module("torchvision.datasets"), self.folder)


# fmt: off
# What --augment may do to a handwritten character: affine (rotation and shear up to 10 degrees, scale
# by up to 10 %, shift by up to 2 pixels, no mirror images); elastic (a displacement field of uniform
# noise blurred by a Gaussian of sigma pixels, times alpha pixels, as Simard et al. 2003 made theirs);
# thickness (each image moved toward its 3x3 grey-scale dilation or erosion by up to this share).
DIGIT_AUGMENT_LIMITS = {"degrees": 10, "scale": 0.1, "shear_degrees": 10, "shift_pixels": 2, "mirror": False,
                        "elastic_sigma_pixels": 4, "elastic_alpha_pixels": 10, "thickness": 0.5}
# Clothes are not drawn by hand: no elastic distortion, no change of thickness; mirror images are clothes too.
CLOTHES_AUGMENT_LIMITS = {**DIGIT_AUGMENT_LIMITS, "degrees": 5, "shear_degrees": 5, "mirror": True,
                          "elastic_alpha_pixels": 0, "thickness": 0}
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
KMNIST_CLASSES = ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")
DATASETS = {dataset.name: dataset for dataset in (
    Dataset("mnist", "MNIST", "MNIST", tuple("0123456789"), 0.1307, 0.3081, "digit", DIGIT_AUGMENT_LIMITS,
            stroke_widths=(1.07, 3.61)),
    Dataset("fashion-mnist", "Fashion-MNIST", "FashionMNIST", FASHION_CLASSES, 0.2860, 0.3530, "object",
            CLOTHES_AUGMENT_LIMITS),
    # KMNIST's statistics are the published ones (Clanuwat et al., 2018): its files cannot be fetched here.
    Dataset("kmnist", "Kuzushiji-MNIST", "KMNIST", KMNIST_CLASSES, 0.1918, 0.3483, "digit", DIGIT_AUGMENT_LIMITS),
)}
# fmt: on


# ----------------------------------------------------------------------------------------------
# LeNet-5, as in the original design: 61,706 parameters
# ----------------------------------------------------------------------------------------------


class LeNet5(nn.Module):
    def __init__(self):
        super().__init__()
        # fmt: off
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, kernel_size=5, padding=2), nn.ReLU(inplace=True), nn.AvgPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5), nn.ReLU(inplace=True), nn.AvgPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * 5 * 5, 120), nn.ReLU(inplace=True),
            nn.Linear(120, 84), nn.ReLU(inplace=True),
            nn.Linear(84, 10),
        )
        # fmt: on

    def forward(self, images):
        return self.classifier(torch.flatten(self.features(images), 1))


def parameter_count(model):
    return sum(parameter.numel() for parameter in model.parameters())


def memory_format_for(device):
    # oneDNN's convolutions run faster on the channels-last layout on a CPU (benchmarks/README.md).
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


def to_device_and_format(model, device):
    """The model on `device`, in the memory format that is fastest there."""
    return model.to(device, memory_format=memory_format_for(device))


def new_model(seed, device):
    torch.manual_seed(seed)
    return to_device_and_format(LeNet5(), device)


# ----------------------------------------------------------------------------------------------
# Data: a dataset's files, checked, then each split as one normalised tensor on the device
# ----------------------------------------------------------------------------------------------

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
TEST_FILES = IDX_FILES[2:]


def raw_dir(data_dir, dataset):
    return Path(data_dir) / dataset.folder / "raw"


def has_files(data_dir, dataset, names=IDX_FILES):
    """Whether the extracted IDX files `names` are all in the dataset's folder."""
    return all((raw_dir(data_dir, dataset) / name).is_file() for name in names)


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


# A split in three forms, each made from the one before:


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


def pixel_split(data_dir, dataset, train, limit):
    """As pixels: (images N x 1 x 28 x 28 in 0..1, labels), the first `limit` of them, on the CPU."""
    images, labels = raw_split(data_dir, dataset, train)
    return images[:limit].float().div_(255).unsqueeze(1), labels[:limit]  # in place: the same numbers, faster


def normalised_split(data_dir, dataset, train, limit, device):
    """As the network takes it: (images normalised like the original pipeline, labels) on `device`."""
    pixels, labels = pixel_split(data_dir, dataset, train, limit)
    # The same arithmetic as ToTensor() then Normalize(), done once for the whole split.
    images = pixels.sub_(dataset.mean).div_(dataset.std)
    return images.to(device).contiguous(memory_format=memory_format_for(device)), labels.to(device)


def load_data(args, runtime):
    """(training split, evaluation split): the test split, or with --validation N the last N
    training images, held out. Under torchrun one process per machine fetches the files while
    the rest wait."""
    dataset = DATASETS[args.dataset]
    if runtime.local_rank == 0:
        prepare_files(args.data_dir, dataset, allow_download=not args.no_download)
    if runtime.world_size > 1:
        dist.barrier()
    if not args.validation:
        train = normalised_split(args.data_dir, dataset, True, args.train_limit, runtime.device)
        return train, normalised_split(args.data_dir, dataset, False, args.test_limit, runtime.device)
    images, labels = normalised_split(args.data_dir, dataset, True, None, runtime.device)
    if args.validation >= len(labels):
        raise CliError(f"--validation {args.validation}: the training split has only {len(labels)} images.")
    kept = len(labels) - args.validation
    limit = args.train_limit
    return (images[:kept][:limit], labels[:kept][:limit]), (images[kept:], labels[kept:])


def evaluation_split(args):
    return "validation" if args.validation else "test"


# ----------------------------------------------------------------------------------------------
# Training: one process, or one of several under torchrun
# ----------------------------------------------------------------------------------------------


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str = "none"

    @property
    def is_main(self):
        return self.rank == 0


def pick_device(device_flag, local_rank=0):
    """The device to compute on: --device, or for auto torch's accelerator where there is one. On
    CUDA, set up for plain fp32 and reproducible kernels first."""
    kind = device_flag
    if device_flag == "auto":
        accelerator = torch.accelerator.current_accelerator(check_available=True)
        kind = accelerator.type if accelerator is not None and accelerator.type in ACCELERATORS else "cpu"
    if kind == "cpu":
        return torch.device("cpu")
    gpus = getattr(torch, kind).device_count()  # torch.cuda, torch.mps or torch.xpu
    if local_rank >= gpus:
        raise CliError(
            f"This process would use GPU {local_rank}, but this machine has {gpus} GPU(s): "
            f"start at most {gpus} process(es) per machine (torchrun --nproc_per_node={gpus}), "
            f"or train on the CPU with --device cpu."
        )
    if kind == "cuda":
        make_cuda_reproducible()
    return torch.device(kind, local_rank)


def is_available(device_flag):
    """Whether --device can be used on this machine."""
    if device_flag in ("auto", "cpu"):
        return True
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    return accelerator is not None and accelerator.type == device_flag


def make_cuda_reproducible():
    """Plain fp32 (no TF32) and deterministic cuDNN and cuBLAS kernels, so that two runs on one GPU
    give the same weights; warn, rather than stop, where an operation has no deterministic kernel."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what cuBLAS needs to be deterministic
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def start_runtime(device_flag):
    """Pick the device, and join the process group when torchrun started this process."""
    if "LOCAL_RANK" not in os.environ:
        return Runtime(pick_device(device_flag))
    local_rank = int(os.environ["LOCAL_RANK"])
    device = pick_device(device_flag, local_rank)
    timeout = datetime.timedelta(minutes=5)
    if device.type == "cpu":
        dist.init_process_group("gloo", timeout=timeout)
    else:  # NCCL on CUDA, XCCL on XPU: torch's own choice for the device
        torch.accelerator.set_device_index(device.index)
        backend = dist.get_default_backend_for_device(device)
        dist.init_process_group(backend, timeout=timeout, device_id=device)
    return Runtime(device, dist.get_rank(), local_rank, dist.get_world_size(), dist.get_backend())


def global_sum(tensor, runtime):
    """The sum of `tensor` over all processes (the tensor itself in a single process)."""
    if runtime.world_size == 1:
        return tensor
    total = tensor.clone()
    dist.all_reduce(total)
    return total


# The recipe's pieces: optimiser, learning-rate schedule, augmentation ---------------------------


class Adam(torch.optim.Optimizer):
    """torch.optim.Adam(fused=True) without the Optimizer class's hooks for torch.compile, which
    import torch._dynamo (seconds of start-up) and do nothing in eager mode. Each step is torch's
    own functional adam(), the fused kernel that torch.optim.Adam calls, with the state kept in
    tensors as it keeps them; state_dict() has its layout, so checkpoints are unchanged. It is an
    Optimizer to the learning-rate schedulers, which read and set its param_groups."""

    def __init__(self, params, lr, betas):  # without Optimizer.__init__, which imports torch._dynamo
        self.defaults = dict(ADAM_DEFAULTS, lr=lr, betas=betas)
        self.param_groups = [{"params": list(params), **self.defaults}]
        self.state = {}  # per parameter, as torch.optim.Adam keeps it: step, exp_avg, exp_avg_sq

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p not in self.state:
                    self.state[p] = new_adam_state(p)
            states = [self.state[p] for p in params]
            beta1, beta2 = group["betas"]
            adam(
                params,
                [p.grad for p in params],
                [state["exp_avg"] for state in states],
                [state["exp_avg_sq"] for state in states],
                [],
                [state["step"] for state in states],
                **{key: group[key] for key in ADAM_DEFAULTS if key not in ("lr", "betas")},
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                has_complex=False,
            )

    def zero_grad(self, set_to_none=True):
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def state_dict(self):
        """As torch.optim.Adam's: the state by the parameter's index, then the group with indices."""
        params = self.param_groups[0]["params"]
        group = {key: value for key, value in self.param_groups[0].items() if key != "params"}
        state = {index: self.state[p] for index, p in enumerate(params) if p in self.state}
        return {"state": state, "param_groups": [{**group, "params": list(range(len(params)))}]}

    def load_state_dict(self, state_dict):
        """As torch.optim.Adam's: each tensor on its parameter's device, the step in float32."""
        params = self.param_groups[0]["params"]
        self.state = {
            params[index]: {
                key: value.to(
                    dtype=torch.float32 if key == "step" else params[index].dtype, device=params[index].device
                )
                for key, value in saved.items()
            }
            for index, saved in state_dict["state"].items()
        }
        [saved_group] = copy.deepcopy(state_dict["param_groups"])
        self.param_groups = [{**saved_group, "params": params}]


# torch.optim.Adam's settings, as its param_groups hold them: fused, no weight decay.
ADAM_DEFAULTS = {
    "lr": None,
    "betas": None,
    "eps": 1e-8,
    "weight_decay": 0,
    "amsgrad": False,
    "maximize": False,
    "foreach": None,
    "capturable": False,
    "differentiable": False,
    "fused": True,
    "decoupled_weight_decay": False,
}


def new_adam_state(parameter):
    """A parameter's Adam state before its first step, as torch.optim.Adam makes it when fused."""
    return {
        "step": torch.zeros((), dtype=torch.float32, device=parameter.device),
        "exp_avg": torch.zeros_like(parameter, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(parameter, memory_format=torch.preserve_format),
    }


def new_optimizer(model, args):
    return Adam(model.parameters(), lr=args.lr, betas=args.adam_betas)


def new_schedule(optimizer, args, steps_per_epoch):
    """The learning-rate schedule, stepped after every batch over all epochs' steps."""
    total_steps = args.epochs * steps_per_epoch
    if args.schedule == "onecycle":
        # cycle_momentum off: Adam's betas stay what --adam-betas says.
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=args.lr, total_steps=total_steps, pct_start=args.warmup, cycle_momentum=False
        )
    if args.schedule == "cosine":
        warmup_steps = max(1, round(args.warmup * total_steps))

        def cosine_with_warmup(step):
            if step < warmup_steps:
                return (step + 1) / warmup_steps
            return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def random_affine_matrices(count, generator, limits):
    """`count` random 2x3 matrices for F.affine_grid: rotation, shear, scale and shift, each way up to
    its limit, and a mirror image half of the time where the limits allow it."""

    def uniform(limit):
        return (torch.rand(count, generator=generator) * 2 - 1) * limit

    angle, shear = uniform(math.radians(limits["degrees"])), uniform(math.radians(limits["shear_degrees"]))
    scale = 1 + uniform(limits["scale"])
    shift = 2 / 28 * limits["shift_pixels"]  # affine_grid spans the 28 pixels with [-1, 1]
    cos, sin, tan = angle.cos(), angle.sin(), shear.tan()
    matrices = torch.stack(
        [
            torch.stack([cos / scale, (cos * tan - sin) / scale, uniform(shift)], 1),
            torch.stack([sin / scale, (sin * tan + cos) / scale, uniform(shift)], 1),
        ],
        1,
    )
    if limits["mirror"]:
        matrices[:, :, 0] *= torch.where(torch.rand(count, generator=generator) < 0.5, -1.0, 1.0).unsqueeze(1)
    return matrices


def random_displacements(count, generator, limits):
    """`count` smooth random displacement fields, count x 28 x 28 x 2 in F.affine_grid's units:
    uniform noise in [-1, 1] blurred by a Gaussian of sigma pixels, times alpha pixels."""
    sigma, alpha = limits["elastic_sigma_pixels"], limits["elastic_alpha_pixels"]
    noise = torch.rand(count, 2, 28, 28, generator=generator) * 2 - 1
    # The blur as two matrix products (a Gaussian is separable): rows, then columns, 3 sigma wide,
    # zero beyond the border; much faster than a convolution with one channel.
    offsets = torch.arange(28).view(-1, 1) - torch.arange(28)
    blur = torch.exp(-0.5 * (offsets / sigma) ** 2) * (offsets.abs() <= math.ceil(3 * sigma))
    blur /= blur[14].sum()  # the weights of one row, away from the border, sum to 1
    return (blur @ noise @ blur * alpha * 2 / 28).permute(0, 2, 3, 1)


def random_thickness(count, generator, limits):
    """`count` amounts in [-limit, limit]: above 0 toward a dilation, below 0 toward an erosion."""
    return (torch.rand(count, generator=generator) * 2 - 1) * limits["thickness"]


def resampled(images, matrices, displacements=None):
    """Each image moved by its own affine matrix, and distorted by its own displacement field if
    given, in one resampling on the images' device; the border value (MNIST's background) fills
    what moves in from outside."""
    grid = F.affine_grid(matrices.to(images.device), list(images.shape), align_corners=False)
    if displacements is not None:
        grid = grid + displacements.to(images.device)
    moved = F.grid_sample(images, grid, padding_mode="border", align_corners=False)
    return moved.contiguous(memory_format=memory_format_for(images.device))


def thickened(images, amounts):
    """Each image's strokes made wider or thinner by its own amount: the image moved that share of
    the way toward its 3x3 grey-scale dilation (amount > 0) or erosion (amount < 0)."""
    dilated = F.max_pool2d(images, 3, stride=1, padding=1)
    eroded = -F.max_pool2d(-images, 3, stride=1, padding=1)
    amounts = amounts.to(images.device).view(-1, 1, 1, 1)
    changed = images + amounts.abs() * (torch.where(amounts > 0, dilated, eroded) - images)
    return changed.contiguous(memory_format=memory_format_for(images.device))


def augment_batch(images, names, generator, count, share, limits):
    """The images of `share` (a slice of a global batch of `count`) with the augmentations `names`:
    every random number is drawn for the whole global batch, in the order affine, elastic, thickness. An
    augmentation whose limit is 0 would change nothing: it is neither drawn nor applied."""
    elastic = "elastic" in names and limits["elastic_alpha_pixels"] > 0
    thickness = "thickness" in names and limits["thickness"] > 0
    affine = "affine" in names
    matrices = random_affine_matrices(count, generator, limits) if affine else torch.eye(2, 3).expand(count, 2, 3)
    displacements = random_displacements(count, generator, limits) if elastic else None
    amounts = random_thickness(count, generator, limits) if thickness else None
    if affine or elastic:
        images = resampled(images, matrices[share], None if displacements is None else displacements[share])
    return images if amounts is None else thickened(images, amounts[share])


def generator_for(*numbers):
    """A generator seeded by these numbers together (the CPU generator keeps 32 bits of a seed)."""
    digest = hashlib.sha256(",".join(map(str, numbers)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:4], "big"))


# The training loop ------------------------------------------------------------------------------


@dataclass
class Progress:
    """Where a training run stands: everything a checkpoint needs to continue it bit-exactly."""

    shuffle_state: torch.Tensor  # the shuffle generator's state at the start of the current epoch
    epoch: int = 0  # epochs completed
    batches_done: int = 0  # batches completed in the current epoch
    # This process's loss sum and correct count of each batch of the current epoch.
    batch_losses: torch.Tensor = None
    batch_correct: torch.Tensor = None
    history: list = field(default_factory=list)  # one summary per completed epoch (see train_epoch)
    logged_losses: list = field(default_factory=list)  # (epochs done, mean loss) at every log line

    def state_dict(self):
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    def epoch_order(self, sample_count):
        """This epoch's permutation of the training samples, the same in every process."""
        shuffle = torch.Generator().set_state(self.shuffle_state)
        order = torch.randperm(sample_count, generator=shuffle)
        return order, shuffle.get_state()

    def begin_epoch(self, batch_count, device):
        if self.batches_done == 0:
            self.batch_losses, self.batch_correct = torch.zeros(batch_count), torch.zeros(batch_count)
        # Per-batch results stay on the device and are read only when logging, so it never waits on us.
        self.batch_losses, self.batch_correct = self.batch_losses.to(device), self.batch_correct.to(device)

    def record_batch(self, batch, loss_sum, correct):
        self.batch_losses[batch], self.batch_correct[batch] = loss_sum, correct
        self.batches_done = batch + 1

    def end_epoch(self, summary, next_shuffle_state):
        self.history.append(summary)
        self.epoch, self.batches_done, self.shuffle_state = self.epoch + 1, 0, next_shuffle_state


def train(args, runtime):
    """Train, evaluating after the epochs --eval-every names, then write every output; returns the
    exit code (130 when Ctrl-C stopped it, after saving the checkpoint)."""
    # Where the wall time goes, in seconds since the epoch, for benchmarks/time_to_accuracy.py. For a
    # run in a process of its own: in-process (the tests), the first two are when the module was imported.
    timeline = {"started": STARTED_AT, "imported": IMPORTED_AT, "main": time.time()}
    train_set, eval_set = load_data(args, runtime)  # first: where the data is bad, no folder is made
    timeline["data_loaded"] = time.time()
    writes = training_files(evaluation_split(args))
    out_dir = prepare_out_dir(args.out_dir, "train", writes) if runtime.is_main else args.out_dir
    checkpoint_path = out_dir / CHECKPOINT_FILE
    model = new_model(args.seed, runtime.device)
    optimizer = new_optimizer(model, args)
    schedule = new_schedule(optimizer, args, steps_per_epoch=batches_per_epoch(len(train_set[1]), args))
    progress = start_or_resume(args, runtime, model, optimizer, schedule, checkpoint_path)
    log_setup(args, runtime, model, train_set, eval_set)
    # The step runs through DDP's wrapper under torchrun; `model` itself is saved and evaluated.
    step_model = model
    if runtime.world_size > 1:
        device_ids = [runtime.device] if runtime.device.type != "cpu" else None
        step_model = DistributedDataParallel(model, device_ids=device_ids)

    split, evaluation = evaluation_split(args), None
    # Under torchrun, torchrun itself handles Ctrl-C for all processes together.
    with StopOnInterrupt(enabled=runtime.world_size == 1) as interrupt:
        while progress.epoch < args.epochs:
            finished = train_epoch(step_model, optimizer, schedule, train_set, progress, args, runtime, interrupt)
            if finished and evaluates_after(progress.epoch, args):
                evaluation = evaluate(model, eval_set, split, runtime)  # not counted in the epoch's seconds
                progress.history[-1].update(
                    eval_loss=evaluation.loss, eval_accuracy=evaluation.accuracy, eval_seconds=evaluation.seconds
                )
            if finished:
                log_epoch(progress.history[-1], args.epochs, split)
            if runtime.is_main:
                save_checkpoint(checkpoint_path, model, optimizer, schedule, progress, args, runtime)
            if not finished:
                log_how_to_resume(args, progress, checkpoint_path)
                return 130

    if evaluation is None:  # the checkpoint held every epoch already
        evaluation = evaluate(model, eval_set, split, runtime)
    log_accuracy(evaluation, DATASETS[args.dataset])
    timeline["evaluated"] = time.time()
    if runtime.is_main:
        write_outputs(out_dir, args, runtime, model, progress, evaluation, timeline, train_set, eval_set)
    return 0


def train_epoch(model, optimizer, schedule, train_set, progress, args, runtime, interrupt):
    """Train until the epoch ends (True) or Ctrl-C asks to stop (False), updating `progress`."""
    sample_count = len(train_set[1])
    order, next_shuffle_state = progress.epoch_order(sample_count)
    order = order.to(runtime.device)
    batch_count = batches_per_epoch(sample_count, args)
    progress.begin_epoch(batch_count, runtime.device)
    epoch, started = progress.epoch + 1, time.perf_counter()
    bar = tqdm(
        total=batch_count,
        initial=progress.batches_done,
        desc=f"Epoch {epoch}/{args.epochs}",
        leave=False,
        disable=bars_disabled(runtime.is_main),
        unit="batch",
    )
    for batch in range(progress.batches_done, batch_count):
        global_batch = order[batch * args.batch_size : (batch + 1) * args.batch_size]
        images, labels = training_batch(train_set, global_batch, args, runtime, epoch, batch)
        # DDP averages gradients over processes; dividing each loss sum by the average share of
        # the global batch makes that average the mean over the global batch, as in one process.
        loss_sum, correct = train_step(
            model, optimizer, schedule, images, labels, len(global_batch) / runtime.world_size, args.label_smoothing
        )
        progress.record_batch(batch, loss_sum, correct)
        bar.update()
        if progress.batches_done % args.log_interval == 0:
            first = batch + 1 - args.log_interval
            loss, accuracy = batch_stats(progress, first, batch + 1, sample_count, args, runtime)
            logger.info("[Epoch {}, Batch {}] loss: {:.4f} accuracy: {:.2f} %", epoch, batch + 1, loss, accuracy)
            progress.logged_losses.append((progress.epoch + (batch + 1) / batch_count, loss))
        if interrupt.requested:
            bar.close()
            check_finite(progress, 0, progress.batches_done, args, runtime)  # never checkpoint a diverged run
            return False
    bar.close()
    loss, accuracy = batch_stats(progress, 0, batch_count, sample_count, args, runtime)
    # The evaluation's values are filled in where the epoch is evaluated.
    summary = {
        "epoch": epoch,
        "loss": loss,
        "train_accuracy": accuracy,
        "seconds": time.perf_counter() - started,
        "eval_loss": None,
        "eval_accuracy": None,
        "eval_seconds": None,
    }
    progress.end_epoch(summary, next_shuffle_state)
    return True


def training_batch(train_set, global_batch, args, runtime, epoch, batch):
    """This process's share of a global batch: its images (augmented if asked) and labels."""
    images, labels = train_set
    my_share = global_batch[runtime.rank :: runtime.world_size]  # every process a disjoint share
    batch_images = images[my_share]
    if args.augment != "none":
        # Drawn for the whole global batch from a generator seeded by (seed, epoch, batch), so that
        # any number of processes, and a resumed run, change every image exactly as one process would.
        generator = generator_for(args.seed, epoch, batch)
        share = slice(runtime.rank, None, runtime.world_size)
        limits = DATASETS[args.dataset].augment_limits
        batch_images = augment_batch(batch_images, args.augment.split(","), generator, len(global_batch), share, limits)
    return batch_images, labels[my_share]


def train_step(model, optimizer, schedule, images, labels, loss_divisor, label_smoothing=0.0):
    """One optimisation step; returns the batch's summed loss and its count of right answers."""
    logits = model(images)
    loss_sum = F.cross_entropy(logits, labels, reduction="sum", label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    (loss_sum / loss_divisor).backward()
    optimizer.step()
    schedule.step()
    return loss_sum.detach(), (logits.argmax(1) == labels).sum()


def batches_per_epoch(sample_count, args):
    return math.ceil(sample_count / args.batch_size)


def check_finite(progress, first, end, args, runtime):
    """The loss sums of batches [first, end) of the current epoch, all processes together; raises
    LossDiverged if any of them is infinite or NaN."""
    losses = global_sum(progress.batch_losses[first:end], runtime).double()
    non_finite = (~torch.isfinite(losses)).nonzero()
    if len(non_finite):
        raise LossDiverged(
            f"The loss became infinite or NaN in epoch {progress.epoch + 1}, batch "
            f"{first + int(non_finite[0]) + 1}. Training stopped; the last checkpoint is "
            f"unchanged. Try a lower --lr (now {args.lr})."
        )
    return losses


def batch_stats(progress, first, end, sample_count, args, runtime):
    """(mean loss, accuracy %) over batches [first, end) of the current epoch, all processes
    together; raises LossDiverged if any of those batches had a non-finite loss."""
    losses = check_finite(progress, first, end, args, runtime)
    correct = global_sum(progress.batch_correct[first:end].sum(), runtime).item()
    seen = min(end * args.batch_size, sample_count) - first * args.batch_size
    return losses.sum().item() / seen, 100 * correct / seen


def evaluates_after(epoch, args):
    return epoch == args.epochs or (args.eval_every and epoch % args.eval_every == 0)


def plural(count, word):
    """'1 epoch', '10 epochs'"""
    return f"{count} {word}{'s' * (count != 1)}"


def log_setup(args, runtime, model, train_set, eval_set):
    processes = f" x {runtime.world_size} processes ({runtime.backend})" if runtime.world_size > 1 else ""
    logger.info("Device: {}{}", runtime.device, processes)
    logger.info("LeNet-5 with {:,} parameters", parameter_count(model))
    logger.info(
        "{} training and {} {} images of {}; {}, batch {}, Adam lr {}",
        len(train_set[1]),
        len(eval_set[1]),
        evaluation_split(args),
        DATASETS[args.dataset].title,
        plural(args.epochs, "epoch"),
        args.batch_size,
        args.lr,
    )
    recipe_settings = ("schedule", "warmup", "adam_betas", "label_smoothing", "augment")
    logger.info(
        "Recipe {}: {}", args.recipe, ", ".join(f"{name} {as_text(getattr(args, name))}" for name in recipe_settings)
    )


def log_epoch(summary, epochs, split):
    evaluated = (
        f", {split} loss {summary['eval_loss']:.4f}, {split} accuracy {summary['eval_accuracy']:.2f} %"
        if summary["eval_loss"] is not None
        else ""
    )
    logger.info(
        "Epoch {}/{}: loss {:.4f}, train accuracy {:.2f} %{}, {:.1f} s",
        summary["epoch"],
        epochs,
        summary["loss"],
        summary["train_accuracy"],
        evaluated,
        summary["seconds"],
    )


# Interruptions and resuming ---------------------------------------------------------------------


class StopOnInterrupt:
    """Turn the first Ctrl-C into a request to stop after the current step; a second one kills."""

    def __init__(self, enabled):
        self.enabled, self.requested, self.previous = enabled, False, None

    def __enter__(self):
        if self.enabled:
            self.previous = signal.signal(signal.SIGINT, self._request)
        return self

    def _request(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)

    def __exit__(self, *exc_info):
        if self.enabled:
            signal.signal(signal.SIGINT, self.previous)


def log_how_to_resume(args, progress, checkpoint_path):
    script = [shown_path(sys.executable), shown_path(Path(__file__))]
    command = shlex.join(script + args.argv[1:] + ([] if args.resume else ["--resume"]))
    logger.warning(
        "Interrupted in epoch {} after batch {}; saved {}. Continue with: {}",
        progress.epoch + 1,
        progress.batches_done,
        checkpoint_path,
        command,
    )


def shown_path(path):
    """`path` relative to the current folder where it lies inside it (venv/bin/python), else whole."""
    path = Path(path).absolute()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def start_or_resume(args, runtime, model, optimizer, schedule, checkpoint_path):
    """A fresh Progress, or the one stored in the checkpoint once it is checked to fit these flags."""
    if not args.resume:
        return Progress(torch.Generator().manual_seed(args.seed).get_state())
    saved = resumable_checkpoint(checkpoint_path, args, runtime)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    schedule.load_state_dict(saved["schedule"])
    progress = Progress(**saved["progress"])
    logger.info(
        "Resuming from {}: {} epochs and {} batches done", checkpoint_path, progress.epoch, progress.batches_done
    )
    return progress


def resumable_checkpoint(checkpoint_path, args, runtime):
    """The checkpoint to resume from, after checking that it can continue a run with these flags."""
    if not checkpoint_path.is_file():
        raise CliError(f"--resume: there is no {checkpoint_path} to continue from.")
    saved = load_checkpoint(checkpoint_path)
    if "progress" not in saved:
        raise CliError(f"--resume: {checkpoint_path} holds a trained model but no training state to continue.")
    if saved.get("format") != CHECKPOINT_FORMAT:
        raise CliError(
            f"--resume: {checkpoint_path} was written by another version of this program (checkpoint "
            f"format {saved.get('format', 1)}, this version reads {CHECKPOINT_FORMAT}) and cannot be "
            f"continued. Start a new run, or use another --out-dir."
        )
    config = training_config(args)
    # A schedule spans all epochs, so with one --epochs must stay too.
    must_match = [s for s in SETTINGS if s.must_match or (s.name == "epochs" and args.schedule != "constant")]
    differences = [
        f"{s.flag} {as_text(saved['config'].get(s.name))} (now {as_text(config[s.name])})"
        for s in must_match
        if saved["config"].get(s.name) != config[s.name]
    ]
    if differences:
        raise CliError(
            f"--resume: {checkpoint_path} was made with "
            + ", ".join(differences)
            + ". Resume with the same settings, or use another --out-dir."
        )
    if saved["progress"]["epoch"] > args.epochs:
        raise CliError(
            f"--resume: {checkpoint_path} already holds {saved['progress']['epoch']} epochs; "
            f"--epochs {args.epochs} cannot go back."
        )
    if saved["ran_on"] != ran_on(runtime):
        before, now = saved["ran_on"], ran_on(runtime)
        logger.warning(
            "Resuming a run made on {} x {} process(es) on {} x {}: it continues correctly, but no "
            "longer bit-exactly (another device or number of processes adds numbers in another order).",
            before["device"],
            before["world_size"],
            now["device"],
            now["world_size"],
        )
    return saved


def ran_on(runtime):
    return {"device": runtime.device.type, "world_size": runtime.world_size}


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


@dataclass
class Evaluation:
    """A model's answers on a whole split (CPU tensors)."""

    split: str  # which split: "test", or "validation" under --validation
    labels: torch.Tensor  # the true classes
    predicted: torch.Tensor  # the model's classes
    confidence: torch.Tensor  # the probability the model gave its class
    loss: float  # the mean cross-entropy
    seconds: float

    @property
    def accuracy(self):
        return 100 * (self.predicted == self.labels).sum().item() / len(self.labels)

    def confusion_matrix(self):
        """counts[true class, predicted class]"""
        return torch.bincount(self.labels * 10 + self.predicted, minlength=100).view(10, 10)

    def class_accuracy(self):
        """Each class's accuracy in percent."""
        counts = self.confusion_matrix()
        return (100 * counts.diag() / counts.sum(1).clamp(min=1)).tolist()

    def worst_mistakes(self, how_many=16):
        """Indices of the wrong answers given with the highest confidence, most confident first."""
        wrong = (self.predicted != self.labels).nonzero().squeeze(1)
        return wrong[self.confidence[wrong].argsort(descending=True, stable=True)][:how_many].tolist()


@torch.inference_mode()
def evaluate(model, eval_set, split, runtime):
    """The model's answers on the whole split; under torchrun each process takes a share. The
    model is left in the mode (training or evaluation) it was in."""
    started = time.perf_counter()
    images, labels = eval_set
    my_share = slice(runtime.rank, None, runtime.world_size)
    my_images = images[my_share]
    was_training = model.training
    model.eval()
    starts = tqdm(
        range(0, len(my_images), EVAL_BATCH_SIZE),
        desc="Evaluating",
        leave=False,
        disable=bars_disabled(runtime.is_main),
    )
    logits = torch.cat([model(my_images[start : start + EVAL_BATCH_SIZE]) for start in starts])
    model.train(was_training)
    predicted = logits.argmax(1)
    # Each process fills in its share; summed over the processes they hold the whole split.
    whole_predicted, whole_confidence = torch.zeros_like(labels), torch.zeros(len(labels), device=labels.device)
    whole_predicted[my_share] = predicted
    whole_confidence[my_share] = F.softmax(logits, 1).gather(1, predicted.unsqueeze(1)).squeeze(1)
    loss_sum = global_sum(F.cross_entropy(logits, labels[my_share], reduction="sum"), runtime)
    whole_predicted, whole_confidence = global_sum(whole_predicted, runtime), global_sum(whole_confidence, runtime)
    return Evaluation(
        split,
        labels.cpu(),
        whole_predicted.cpu(),
        whole_confidence.cpu(),
        loss_sum.item() / len(labels),
        time.perf_counter() - started,
    )


def log_accuracy(evaluation, dataset, images=None):
    """'Accuracy of the network on the 10000 test images: 98.940 %', then each class's; `images`
    names them otherwise ('images in my_digits'). A class without images has no accuracy."""
    images = images or f"{evaluation.split} images"
    logger.info("Accuracy of the network on the {} {}: {:.3f} %", len(evaluation.labels), images, evaluation.accuracy)
    counts = evaluation.confusion_matrix().sum(1).tolist()
    per_class = [
        f"{name} {accuracy:.1f} %" if count else f"{name} (none)"
        for name, accuracy, count in zip(dataset.classes, evaluation.class_accuracy(), counts)
    ]
    logger.info("Accuracy per class: {}", ", ".join(per_class))


# ----------------------------------------------------------------------------------------------
# The grids: 4x4 images with a title each, drawn on matplotlib Figures without pyplot, so that
# importing this script changes no backend
# ----------------------------------------------------------------------------------------------


def sample_indices(count, seed, how_many=16):
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:how_many].tolist()


def display_pixels(image, dataset):
    """A normalised 1 x 28 x 28 tensor back to 0..1 pixels for display."""
    return (image.float().cpu().squeeze(0) * dataset.std + dataset.mean).clamp(0, 1).numpy()


def grid_title(predicted, truth, classes, confidence=None):
    """'pred 7', or 'pred 3 (true 5)' when wrong, with the confidence if given; two lines when long."""
    title = f"pred {classes[predicted]}"
    if predicted != truth:
        title += f" (true {classes[truth]})"
    if confidence is not None:
        title += f" {100 * confidence:.1f} %"
    return title if len(title) <= 20 else title.replace(" (", "\n(", 1)


def has_long_names(dataset):
    """Whether the class names need slanted tick labels to fit side by side."""
    return max(map(len, dataset.classes)) > 2


def new_figure(width, height):
    """A matplotlib Figure of width x height inches. matplotlib is imported with the first figure,
    so that the commands that draw none start without it."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def save_figure(figure, path):
    write_atomically(path, lambda file: figure.savefig(file, format="png", dpi=FIGURE_DPI))


def plot_digit_grid(images, titles, heading, path, dataset, title_colors=None, title_size=10):
    """A 4x4 grid of images under a heading, with a title above each image."""
    figure = new_figure(FIGURE_INCHES, FIGURE_INCHES)
    figure.suptitle(heading)
    for index, axis in enumerate(figure.subplots(4, 4).flat):
        axis.axis("off")
        axis.set(xticks=[], yticks=[])  # none are drawn anyway; without them the layout is found faster
        if index < len(images):
            axis.imshow(display_pixels(images[index], dataset), cmap="gray", vmin=0, vmax=1)
            axis.set_title(titles[index], fontsize=title_size, color=(title_colors or ["black"] * 16)[index])
    figure.tight_layout()
    save_figure(figure, path)


def plot_samples(images_and_labels, seed, heading, path, dataset):
    """16 random images of a split with their labels."""
    images, labels = images_and_labels
    chosen = sample_indices(len(labels), seed)
    plot_digit_grid(images[chosen], [dataset.classes[labels[i]] for i in chosen], heading, path, dataset)


def plot_predictions(eval_set, evaluation, seed, path, dataset):
    """16 random images of the split, each titled with the model's answer, in red where it is wrong."""
    images, _ = eval_set
    chosen = sample_indices(len(evaluation.labels), seed)
    predicted, truth = evaluation.predicted[chosen].tolist(), evaluation.labels[chosen].tolist()
    titles = [grid_title(p, t, dataset.classes) for p, t in zip(predicted, truth)]
    colors = ["black" if p == t else "red" for p, t in zip(predicted, truth)]
    right = sum(p == t for p, t in zip(predicted, truth))
    heading = f"Predictions on {evaluation.split} images: {right} of 16 right"
    plot_digit_grid(images[chosen], titles, heading, path, dataset, colors)


# ----------------------------------------------------------------------------------------------
# A run's results: the model, figures, the report, and metrics.json, written by the main process
# ----------------------------------------------------------------------------------------------


def training_config(args):
    """The settings that define a training run, as recorded in metrics.json and checkpoints."""
    config = {s.name: getattr(args, s.name) for s in SETTINGS if s.recorded and "train" in s.commands}
    # As JSON has them: paths as text, tuples as lists (so that a loaded config compares equal).
    return {
        name: str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
        for name, value in config.items()
    }


def write_outputs(out_dir, args, runtime, model, progress, evaluation, timeline, train_set, eval_set):
    """The model file, then the six figures, report.html and last metrics.json."""
    from companions import report

    dataset, split = DATASETS[args.dataset], evaluation.split
    save_model(out_dir / MODEL_FILE, model, training_config(args), evaluation)
    # The six figures in two processes: a copy of this one draws the evaluation's three meanwhile.
    with report.drawn_beside(report.write_evaluation_figures, out_dir, eval_set, evaluation, args.seed, dataset):
        plot_samples(train_set, args.seed, "Training images (true label)", out_dir / TRAIN_IMAGES_PNG, dataset)
        heading = f"{split.capitalize()} images (true label)"
        plot_samples(eval_set, args.seed + 1, heading, out_dir / split_images_png(split), dataset)
        report.plot_training_curves(progress, split, out_dir / CURVES_PNG, report.training_measured_on(args))
    report.write_training_report(out_dir, args, runtime, model, progress, evaluation, timeline)
    logger.info(
        "Wrote {}, {}, {}, the figures and {} into {}/", MODEL_FILE, CHECKPOINT_FILE, METRICS_FILE, REPORT_FILE, out_dir
    )


# ----------------------------------------------------------------------------------------------
# The commands
# ----------------------------------------------------------------------------------------------


def train_command(args):
    runtime = start_runtime(args.device)
    try:
        return train(args, runtime)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_command(args):
    """The command's exit code. evaluate, predict, serve and export live in companions/, imported
    only when they run."""
    if args.command == "train":
        return train_command(args)
    return importlib.import_module(f"companions.{args.command}").command(args)


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------


class CliError(Exception):
    """A problem the user can fix; reported as one message, without a traceback."""

    def __init__(self, message, exit_code=2):
        super().__init__(message)
        self.exit_code = exit_code


class LossDiverged(Exception):
    """The training loss became infinite or NaN; training stops with exit code 1."""


def bars_disabled(is_main):
    """tqdm's `disable`: None lets tqdm decide (bars in a terminal, none in a log file); True hides
    them in every process but the main one."""
    return None if is_main else True


def configure_logging(is_main):
    # Through tqdm.write so that log lines do not break the progress bars.
    logger.remove()
    logger.add(
        lambda message: tqdm.write(message, end="", file=sys.stderr),
        level="INFO" if is_main else "WARNING",
        colorize=sys.stderr.isatty(),
        format="<green>{time:HH:mm:ss}</green> | <level>{level: <7}</level> | {message}",
    )


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def main(argv=None):
    """Run one command; returns the process exit code (bad flags raise SystemExit(2) from argparse)."""
    args = parse_args(argv)
    configure_logging(is_main=int(os.environ.get("RANK", 0)) == 0)
    try:
        return run_command(args)
    except CliError as error:
        logger.error(str(error))
        return error.exit_code
    except LossDiverged as error:
        logger.error(str(error))
        return 1
    except KeyboardInterrupt:
        logger.warning("Interrupted.")
        return 130


def exit_status(code):
    """The process's exit status for main's result or a SystemExit's code, as Python's own exit
    makes it: None is success, a number is itself, anything else is printed and is 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


if __name__ == "__main__":
    try:
        exit_code = main()
    except SystemExit as exit:  # --help, and flags that argparse refuses
        exit_code = exit.code
    # Everything is written and closed. Skip the interpreter's shutdown, its garbage collections
    # over the millions of objects that torch's modules hold and their teardown: the operating
    # system takes the memory back at once anyway.
    status = exit_status(exit_code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
