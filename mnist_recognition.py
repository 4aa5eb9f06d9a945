#!/usr/bin/env python3
"""LeNet-5 on MNIST: train it, see how it learned, check it, and try it on your own handwriting.

    python mnist_recognition.py                       # the original recipe; outputs/ gets the model,
                                                      # metrics.json, nine figures and report.html
    python mnist_recognition.py --recipe fast         # one pass over the data
    python mnist_recognition.py --recipe best         # augmented, 30 epochs
    python mnist_recognition.py --dataset fashion-mnist
    python mnist_recognition.py evaluate              # outputs/evaluation/
    python mnist_recognition.py predict my_digit.png
    python mnist_recognition.py serve                 # a page to draw a digit on: http://127.0.0.1:8000/
    python mnist_recognition.py export                # outputs/lenet5_mnist.onnx, checked with ONNX Runtime
    python mnist_recognition.py --pool max --batch-norm   # a variant of LeNet-5 from the original report
    python mnist_recognition.py compare --vary pool=max batch_norm=true --seeds 5 --recipe fast
    torchrun --standalone --nproc_per_node=2 mnist_recognition.py

This file is the training, in the order the data flows: the settings, LeNet-5, the data (a Dataset
and a DataLoader), the training loop, evaluation, the 4x4 grids of images, and main. The
companions/ package beside it holds the plumbing each of these calls in one line (the command
line, the dataset's files, devices, Adam, the augmentation, resuming, atomic files, each layer's
cost), none of which imports this file; and what uses a trained model or decorates a run
(evaluate, predict, serve, export, finetune, compare, the report), each imported only by the
command that needs it.

Each split is loaded once into a normalised tensor on the training device; the DataLoader's
batches are drawn from it by one indexing operation each, in a seeded order. On one machine every
run with the same flags gives the same numbers to the last bit; training resumes bit-exactly from
checkpoints, and the same script runs under torchrun with DistributedDataParallel.
"""

import time

STARTED_AT = time.time()  # before the imports below, so that a run's timeline shows what they cost

import importlib
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from loguru import logger
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from companions.doubt import kept_detector, verdicts
from companions.reports.grids import grid_title, plot_digit_grid
from companions.training import command_line, exclusions, layers
from companions.training.adam import Adam  # torch's fused Adam, bit for bit, without torch.compile's hooks
from companions.training.augment import augment_batch, generator_for
from companions.training.command_line import (
    Setting,
    adam_betas,
    as_text,
    augmentation_list,
    fraction,
    layer_widths,
    network_depth,
    non_negative_float,
    non_negative_int,
    plural,
    positive_float,
    positive_int,
)
from companions.training.dataset_files import prepare_files, raw_split
from companions.training.datasets import DATASETS
from companions.training.devices import ACCELERATORS, global_sum, memory_format_for, ran_on, start_runtime, to_device
from companions.training.errors import CliError, LossDiverged
from companions.training.files import (
    CALIBRATION_PNG,
    CHECKPOINT_FILE,
    CONFUSION_PNG,
    CURVES_PNG,
    METRICS_FILE,
    MISTAKES_PNG,
    MODEL_FILE,
    PREDICTIONS_PNG,
    REPORT_FILE,
    TRAIN_IMAGES_PNG,
    prepare_out_dir,
    save_checkpoint,
    save_model,
    split_images_png,
    training_figures,
)
from companions.training.resume import (
    Progress,
    StopOnInterrupt,
    log_how_to_resume,
    restore_random_state,
    resumable_checkpoint,
)
from companions.training.schedules import new_schedule

IMPORTED_AT = time.time()

# ----------------------------------------------------------------------------------------------
# Settings: every flag declared once, and the recipes (the datasets: companions/training/datasets.py)
# ----------------------------------------------------------------------------------------------

EVAL_BATCH_SIZE = 1000  # evaluation needs no gradients, so large batches cost little memory
COMMANDS = ("train", "evaluate", "predict", "serve", "export", "finetune", "compare", "search", "audit")

DATA_COMMANDS = ("train", "evaluate", "finetune")  # the commands that read a dataset's files
# fmt: off
SETTINGS = (
    Setting("recipe", "original", "a named set of defaults for the settings below (see RECIPES); "
            "a flag given explicitly wins over its recipe", choices=("original", "fast", "best"), must_match=True),
    Setting("epochs", 10, "passes over the training set", positive_int),
    Setting("batch_size", 64, "training batch size (the global batch under torchrun)", positive_int,
            must_match=True),
    Setting("optimizer", "adam", "torch.optim's Adam, AdamW, SGD, RMSprop or Adagrad",
            choices=("adam", "adamw", "sgd", "rmsprop", "adagrad"), must_match=True),
    Setting("lr", 1e-3, "learning rate (the peak rate with a schedule)", positive_float, must_match=True),
    Setting("momentum", 0.0, "momentum (sgd and rmsprop only)", fraction, must_match=True),
    Setting("weight_decay", 0.0, "weight decay (decoupled from the gradient with adamw)", non_negative_float,
            must_match=True),
    Setting("schedule", "constant", "learning-rate schedule over all steps: constant; onecycle (warm-up "
            "from lr/25, then cosine down); cosine (linear warm-up from 0, then cosine down); step (lr, then "
            "lr/10 after half the steps, lr/100 after three quarters)",
            choices=("constant", "onecycle", "cosine", "step"), must_match=True),
    Setting("warmup", 0.25, "the share of all steps that warms the learning rate up (onecycle, cosine)",
            fraction, must_match=True),
    Setting("adam_betas", (0.9, 0.999), "Adam's and AdamW's beta1,beta2", adam_betas, must_match=True),
    Setting("label_smoothing", 0.0, "cross-entropy label smoothing", fraction, must_match=True),
    Setting("augment", "none", "training-image augmentation, drawn anew for every image in every epoch: none, "
            "or a list of: affine (a random rotation, scale, shear and shift), elastic (a smooth random "
            "distortion, as of a hand), thickness (strokes made randomly thinner or wider)", augmentation_list,
            must_match=True),
    # The network: LeNet-5 as the original design has it, or the variants its report lists.
    Setting("widths", (6, 16, 120, 84), "conv1's and conv2's maps, fc1's and fc2's units: C1,C2,F1,F2",
            layer_widths, must_match=True),
    Setting("pool", "avg", "the pooling after each convolution", choices=("avg", "max"), must_match=True),
    Setting("activation", "relu", "the activation after every layer but the last",
            choices=("relu", "leaky_relu", "elu", "tanh"), must_match=True),
    Setting("batch_norm", False, "batch normalisation after each convolution", must_match=True),
    Setting("depth", 0, "extra 3x3 convolutions in each stage, after its 5x5 one and before its pooling (padding 1, "
            "as many maps): a deeper LeNet-5; 0: the original", network_depth, must_match=True),
    Setting("dropout", 0.0, "dropout before fc2 and fc3, with this probability; 0: none", fraction, must_match=True),
    Setting("seed", 0, "seed for weights, shuffling, augmentation and the images shown in figures", int,
            commands=DATA_COMMANDS, must_match=True),
    Setting("validation", 0, "hold out the last N training images and evaluate on them instead of the "
            "test set (to choose settings without looking at the test set); 0: off", non_negative_int,
            must_match=True),
    Setting("train_limit", None, "use only the first N training images (quick runs; default: all)",
            positive_int, must_match=True),
    Setting("exclude", None, "leave out of training the images this JSON file names: an audit.json's suspects "
            "(those of 'audit --split train'; finetune: of 'audit --images' too), or a list of training-split "
            "indices", Path, commands=("train", "finetune"), must_match=True),
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
    Setting("no_figures", False, "write the model, checkpoint and metrics.json only: no figures and no report.html "
            "(quicker; compare's runs)", recorded=False),
    Setting("no_detector", False, "give the model no 'not a digit' detector (the dataset's, learned once and kept "
            "in its folder): its answers are only sure or not sure", recorded=False),
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


# ----------------------------------------------------------------------------------------------
# LeNet-5, as in the original design: 61,706 parameters
# ----------------------------------------------------------------------------------------------


ACTIVATIONS = {
    "relu": lambda: nn.ReLU(inplace=True),
    "leaky_relu": lambda: nn.LeakyReLU(inplace=True),
    "elu": lambda: nn.ELU(inplace=True),
    "tanh": nn.Tanh,
}
POOLS = {"avg": nn.AvgPool2d, "max": nn.MaxPool2d}
ARCHITECTURE = ("widths", "pool", "activation", "batch_norm", "dropout", "depth")  # the settings that shape the network


class LeNet5(nn.Module):
    """LeNet-5; the defaults are the original design, the arguments the variants of its report."""

    def __init__(self, widths=(6, 16, 120, 84), pool="avg", activation="relu", batch_norm=False, dropout=0.0, depth=0):
        super().__init__()
        c1, c2, f1, f2 = widths
        activate, pooling = ACTIVATIONS[activation], POOLS[pool]

        def convolution(maps_in, maps_out, size=5, **padding):  # a convolution, its batch norm and activation
            normalise = [nn.BatchNorm2d(maps_out)] if batch_norm else []
            return [nn.Conv2d(maps_in, maps_out, kernel_size=size, **padding), *normalise, activate()]

        def stage(maps_in, maps_out, **padding):  # the 5x5 convolution, `depth` more of 3x3, then pooling
            deeper = [module for _ in range(depth) for module in convolution(maps_out, maps_out, 3, padding=1)]
            return [*convolution(maps_in, maps_out, **padding), *deeper, pooling(2)]

        def drop():
            return [nn.Dropout(dropout)] if dropout else []

        self.features = nn.Sequential(*stage(1, c1, padding=2), *stage(c1, c2))
        # fmt: off
        self.classifier = nn.Sequential(
            nn.Linear(c2 * 5 * 5, f1), activate(), *drop(),
            nn.Linear(f1, f2), activate(), *drop(),
            nn.Linear(f2, 10),
        )
        # fmt: on

    def forward(self, images):
        return self.classifier(torch.flatten(self.features(images), 1))


def architecture(config):
    """LeNet5's arguments from a run's settings: args, or a recorded config (where one holds none of
    them, it was the original design)."""
    values = config if isinstance(config, dict) else vars(config)
    chosen = {
        setting.name: values.get(setting.name, setting.default) for setting in SETTINGS if setting.name in ARCHITECTURE
    }
    return chosen | {"widths": tuple(chosen["widths"])}


def describe_architecture(model, arguments):
    """'LeNet-5 (61,706 parameters)', or with what differs from the original design:
    'LeNet-5, pool max, batch_norm (61,750 parameters)'."""
    changed = [
        name if value is True else f"{name} {as_text(value)}"
        for name, value in arguments.items()
        if value != next(s.default for s in SETTINGS if s.name == name)
    ]
    return f"LeNet-5{''.join(', ' + text for text in changed)} ({parameter_count(model):,} parameters)"


def parameter_count(model):
    return sum(parameter.numel() for parameter in model.parameters())


def new_model(seed, device, **arguments):
    torch.manual_seed(seed)
    try:
        return to_device(LeNet5(**arguments), device)
    except (RuntimeError, MemoryError) as error:  # torch's allocators refuse in a RuntimeError
        if not isinstance(error, MemoryError) and "allocate" not in str(error) and "out of memory" not in str(error):
            raise
        raise too_big(arguments, device) from None


def too_big(arguments, device):
    """The one line for a network whose weights cannot be allocated: its size, counted on torch's
    meta device, where nothing is allocated."""
    with torch.device("meta"):
        count = parameter_count(LeNet5(**arguments))
    return CliError(
        f"--widths {as_text(arguments['widths'])}: the network would have {count:,} parameters, "
        f"{4 * count / 2**30:,.1f} GiB as float32 before Adam's state and the activations, more than {device} "
        f"can allocate. Give smaller widths."
    )


# ----------------------------------------------------------------------------------------------
# Data: each split as one normalised tensor on the device, a Dataset, and a DataLoader over it
# ----------------------------------------------------------------------------------------------


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


def leave_out_excluded(train_set, args, runtime):
    """The training images but those --exclude names (by index in the whole training split)."""
    indices = exclusions.training_indices(args.exclude, DATASETS[args.dataset])
    images, labels = exclusions.kept(train_set, indices)
    logger.info("Left out {} training images that {} names", len(train_set[1]) - len(labels), args.exclude)
    return images.contiguous(memory_format=memory_format_for(runtime.device)), labels


def evaluation_split(args):
    return "validation" if args.validation else "test"


class Split(torch.utils.data.Dataset):
    """A split as the network takes it: images (N x 1 x 28 x 28, normalised) and labels, on the
    device. The DataLoader hands __getitems__ a whole batch, which is one indexing operation:
    no image is fetched, or collated, on its own."""

    def __init__(self, images, labels, augment="none", seed=0, limits=None):
        self.images, self.labels = images, labels
        self.augment, self.seed, self.limits = augment, seed, limits

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], self.labels[index]

    def __getitems__(self, batch):
        """(images, labels) of a slice of the split, or of this process's share of a training Batch,
        augmented where the recipe asks."""
        if isinstance(batch, slice):
            return self.images[batch], self.labels[batch]
        mine = batch.indices[batch.share]
        images = self.images[mine]
        if self.augment != "none":
            # Drawn for the whole global batch from a generator seeded by (seed, epoch, batch), so that
            # any number of processes, and a resumed run, change every image exactly as one process would.
            generator = generator_for(self.seed, batch.epoch, batch.number)
            names = self.augment.split(",")
            images = augment_batch(images, names, generator, len(batch.indices), batch.share, self.limits)
        return images, self.labels[mine]


@dataclass
class Batch:
    """What one training step takes: this process's share of one global batch of the epoch."""

    epoch: int  # counted from 1
    number: int  # its place in the epoch, counted from 0
    indices: torch.Tensor  # the global batch: indices into the training split
    share: slice  # this process's part of them (all of them in one process)


class GlobalBatches(torch.utils.data.Sampler):
    """The DataLoader's batch_sampler: the epoch's global batches, cut in order from its seeded
    permutation, from batch `first` on (where a resumed run stopped). Under torchrun every process
    draws the same permutation and takes its own share of each batch."""

    def __init__(self, order, batch_size, epoch, first, runtime):
        self.order, self.batch_size, self.epoch, self.first = order, batch_size, epoch, first
        self.share = slice(runtime.rank, None, runtime.world_size)

    def __len__(self):
        return math.ceil(len(self.order) / self.batch_size) - self.first

    def __iter__(self):
        for number in range(self.first, self.first + len(self)):
            indices = self.order[number * self.batch_size : (number + 1) * self.batch_size]
            yield Batch(self.epoch, number, indices, self.share)


def whole(batch):
    """The DataLoader's collate_fn: __getitems__ gives each batch whole already."""
    return batch


def training_split(train_set, args):
    return Split(*train_set, args.augment, args.seed, DATASETS[args.dataset].augment_limits)


def training_loader(train_split, order, epoch, first, args, runtime):
    """The epoch's batches from batch `first` on, each this process's share, as a DataLoader."""
    batches = GlobalBatches(order, args.batch_size, epoch, first, runtime)
    # num_workers=0: the data is on the device. A generator of its own: a DataLoader draws a seed from
    # it for every epoch, which would otherwise move the global one that dropout draws from.
    return DataLoader(train_split, batch_sampler=batches, collate_fn=whole, generator=torch.Generator())


# ----------------------------------------------------------------------------------------------
# Training: one process, or one of several under torchrun
# ----------------------------------------------------------------------------------------------


def check_optimizer_settings(args):
    if args.momentum and args.optimizer not in ("sgd", "rmsprop"):
        raise CliError(
            f"--momentum is for --optimizer sgd or rmsprop, not {args.optimizer}: leave it out, or choose one of those."
        )


def new_optimizer(model, args):
    """--optimizer, from torch.optim. Adam is the dynamo-free copy of torch.optim.Adam(fused=True)."""
    parameters, lr, decay = model.parameters(), args.lr, args.weight_decay
    if args.optimizer == "adam" and not decay:
        return Adam(parameters, lr=lr, betas=args.adam_betas)
    if args.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=lr, betas=args.adam_betas, weight_decay=decay)
    if args.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, betas=args.adam_betas, weight_decay=decay)
    if args.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=args.momentum, weight_decay=decay)
    if args.optimizer == "rmsprop":
        return torch.optim.RMSprop(parameters, lr=lr, momentum=args.momentum, weight_decay=decay)
    return torch.optim.Adagrad(parameters, lr=lr, weight_decay=decay)


# The training loop ------------------------------------------------------------------------------


def train(args, runtime, after_epoch=None):
    """Train, evaluating after the epochs --eval-every names, then write every output; returns the
    exit code (130 when Ctrl-C stopped it, after saving the checkpoint). `after_epoch`, where given,
    sees each finished epoch's summary (search stops weak trials by it)."""
    # Where the wall time goes, in seconds since the epoch, for benchmarks/time_to_accuracy.py. For a
    # run in a process of its own: in-process (the tests), the first two are when the module was imported.
    timeline = {"started": STARTED_AT, "imported": IMPORTED_AT, "main": time.time()}
    check_optimizer_settings(args)
    train_set, eval_set = load_data(args, runtime)  # first: where the data is bad, no folder is made
    if args.exclude:
        train_set = leave_out_excluded(train_set, args, runtime)
    timeline["data_loaded"] = time.time()
    writes = training_files(evaluation_split(args))
    out_dir = prepare_out_dir(args.out_dir, "train", writes) if runtime.is_main else args.out_dir
    checkpoint_path = out_dir / CHECKPOINT_FILE
    model = new_model(args.seed, runtime.device, **architecture(args))
    optimizer = new_optimizer(model, args)
    schedule = new_schedule(optimizer, args, steps_per_epoch=batches_per_epoch(len(train_set[1]), args))
    progress = start_or_resume(args, runtime, model, optimizer, schedule, checkpoint_path)
    log_setup(args, runtime, model, optimizer, train_set, eval_set)
    train_split = training_split(train_set, args)
    # The step runs through DDP's wrapper under torchrun; `model` itself is saved and evaluated.
    step_model = model
    if runtime.world_size > 1:
        device_ids = [runtime.device] if runtime.device.type != "cpu" else None
        step_model = DistributedDataParallel(model, device_ids=device_ids)

    split, evaluation = evaluation_split(args), None
    # Under torchrun, torchrun itself handles Ctrl-C for all processes together.
    with StopOnInterrupt(enabled=runtime.world_size == 1) as interrupt:
        while progress.epoch < args.epochs:
            finished = train_epoch(step_model, optimizer, schedule, train_split, progress, args, runtime, interrupt)
            if finished and evaluates_after(progress.epoch, args):
                evaluation = evaluate(model, eval_set, split, runtime)  # not counted in the epoch's seconds
                progress.history[-1].update(
                    eval_loss=evaluation.loss, eval_accuracy=evaluation.accuracy, eval_seconds=evaluation.seconds
                )
            if finished:
                log_epoch(progress.history[-1], args.epochs, split)
            if runtime.is_main:
                save_checkpoint(
                    checkpoint_path, model, optimizer, schedule, progress, training_config(args), ran_on(runtime)
                )
            if not finished:
                log_how_to_resume(Path(__file__), args.argv[1:], args.resume, progress, checkpoint_path)
                return 130
            if after_epoch:
                after_epoch(progress.history[-1])

    if evaluation is None:  # the checkpoint held every epoch already
        evaluation = evaluate(model, eval_set, split, runtime)
    log_accuracy(evaluation, DATASETS[args.dataset])
    timeline["evaluated"] = time.time()
    if runtime.is_main:
        # What the model knows it does not know, learned from the training images (companions/doubt/verdicts.py):
        # a temperature that calibrates its probabilities, the "not sure" threshold, and beside it the
        # dataset's "not a digit" detector, learned once per dataset. The model's own weights stay as they are.
        dataset = DATASETS[args.dataset]
        detector = () if args.no_detector else kept_detector.detector_for(args.data_dir, dataset, runtime.device)
        learned = verdicts.learn_doubt(model, *train_set, dataset, args.seed, *detector)
        timeline["doubt_learned"] = time.time()
        write_outputs(out_dir, args, runtime, model, progress, evaluation, timeline, train_set, eval_set, learned)
    return 0


def train_epoch(model, optimizer, schedule, train_split, progress, args, runtime, interrupt):
    """Train until the epoch ends (True) or Ctrl-C asks to stop (False), updating `progress`."""
    sample_count = len(train_split)
    batch_count = batches_per_epoch(sample_count, args)
    order, next_shuffle_state = progress.epoch_order(sample_count)
    epoch, first = progress.epoch + 1, progress.batches_done
    loader = training_loader(train_split, order.to(runtime.device), epoch, first, args, runtime)
    progress.begin_epoch(batch_count, runtime.device)
    started = time.perf_counter()
    bar = tqdm(
        total=batch_count,
        initial=first,
        desc=f"Epoch {epoch}/{args.epochs}",
        leave=False,
        disable=bars_disabled(runtime.is_main),
        unit="batch",
    )
    for batch, (images, labels) in enumerate(loader, start=first):
        # DDP averages gradients over processes; dividing each loss sum by the average share of
        # the global batch makes that average the mean over the global batch, as in one process.
        global_batch_size = min(args.batch_size, sample_count - batch * args.batch_size)
        loss_divisor = global_batch_size / runtime.world_size
        loss_sum, correct = train_step(model, optimizer, schedule, images, labels, loss_divisor, args.label_smoothing)
        progress.record_batch(batch, loss_sum, correct)
        bar.update()
        if progress.batches_done % args.log_interval == 0:
            log_batches(progress, batch, batch_count, sample_count, args, runtime)
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


def log_batches(progress, batch, batch_count, sample_count, args, runtime):
    """The mean loss and accuracy of the last --log-interval batches, logged and kept for the curves."""
    loss, accuracy = batch_stats(progress, batch + 1 - args.log_interval, batch + 1, sample_count, args, runtime)
    logger.info("[Epoch {}, Batch {}] loss: {:.4f} accuracy: {:.2f} %", progress.epoch + 1, batch + 1, loss, accuracy)
    progress.logged_losses.append((progress.epoch + (batch + 1) / batch_count, loss))


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


def log_setup(args, runtime, model, optimizer, train_set, eval_set):
    processes = f" x {runtime.world_size} processes ({runtime.backend})" if runtime.world_size > 1 else ""
    logger.info(f"Device: {runtime.device}{processes}")
    logger.info(f"{describe_architecture(model, architecture(args))}; each layer's cost:")
    for line in layers.table_lines(layers.layer_costs(model, args.batch_size), args.batch_size):
        logger.info("  " + line)
    images = f"{len(train_set[1])} training and {len(eval_set[1])} {evaluation_split(args)} images"
    epochs = f"{plural(args.epochs, 'epoch')}, batch {args.batch_size}, {type(optimizer).__name__} lr {args.lr}"
    logger.info(f"{images} of {DATASETS[args.dataset].title}; {epochs}")
    recipe = ("schedule", "warmup", "adam_betas", "momentum", "weight_decay", "label_smoothing", "augment")
    logger.info(f"Recipe {args.recipe}: " + ", ".join(f"{name} {as_text(getattr(args, name))}" for name in recipe))


def log_epoch(summary, epochs, split):
    line = f"Epoch {summary['epoch']}/{epochs}: loss {summary['loss']:.4f}"
    line += f", train accuracy {summary['train_accuracy']:.2f} %"
    if summary["eval_loss"] is not None:
        line += f", {split} loss {summary['eval_loss']:.4f}, {split} accuracy {summary['eval_accuracy']:.2f} %"
    logger.info(f"{line}, {summary['seconds']:.1f} s")


def start_or_resume(args, runtime, model, optimizer, schedule, checkpoint_path):
    """A fresh Progress, or the one stored in the checkpoint once it is checked to fit these flags."""
    if not args.resume:
        return Progress(torch.Generator().manual_seed(args.seed).get_state())
    saved = resumable_checkpoint(checkpoint_path, model, training_config(args), SETTINGS, ran_on(runtime))
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    schedule.load_state_dict(saved["schedule"])
    progress = Progress(**saved["progress"])
    restore_random_state(saved)  # dropout draws on where the run stopped
    logger.info(
        "Resuming from {}: {} epochs and {} batches done", checkpoint_path, progress.epoch, progress.batches_done
    )
    return progress


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
    mine = Split(images[my_share], labels[my_share])
    chunks = [slice(start, start + EVAL_BATCH_SIZE) for start in range(0, len(mine), EVAL_BATCH_SIZE)]
    loader = DataLoader(mine, batch_sampler=chunks, collate_fn=whole)
    was_training = model.training
    model.eval()
    batches = tqdm(loader, desc="Evaluating", leave=False, disable=bars_disabled(runtime.is_main))
    logits = torch.cat([model(batch_images) for batch_images, _ in batches])
    model.train(was_training)
    predicted = logits.argmax(1)
    # Each process fills in its share; summed over the processes they hold the whole split.
    whole_predicted, whole_confidence = torch.zeros_like(labels), torch.zeros(len(labels), device=labels.device)
    whole_predicted[my_share] = predicted
    whole_confidence[my_share] = F.softmax(logits, 1).gather(1, predicted.unsqueeze(1)).squeeze(1)
    loss_sum = global_sum(F.cross_entropy(logits, labels[my_share], reduction="sum"), runtime)
    whole_predicted, whole_confidence = global_sum(whole_predicted, runtime), global_sum(whole_confidence, runtime)
    seconds, mean_loss = time.perf_counter() - started, loss_sum.item() / len(labels)
    return Evaluation(split, labels.cpu(), whole_predicted.cpu(), whole_confidence.cpu(), mean_loss, seconds)


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
# The grids: 4x4 images with a title each (companions/reports/grids.py draws them)
# ----------------------------------------------------------------------------------------------


def sample_indices(count, seed, how_many=16):
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:how_many].tolist()


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


def draw_evaluation_figures(out_dir, eval_set, evaluation, seed, dataset, trust):
    """What an evaluation shows: which classes it confuses, its worst mistakes, 16 answers, and how far
    its probabilities can be trusted."""
    from companions.doubt.trust import plot_calibration
    from companions.reports import report

    report.plot_confusion_matrix(evaluation, out_dir / CONFUSION_PNG, dataset)
    report.plot_mistakes(eval_set, evaluation, out_dir / MISTAKES_PNG, dataset)
    plot_predictions(eval_set, evaluation, seed, out_dir / PREDICTIONS_PNG, dataset)
    plot_calibration(trust, out_dir / CALIBRATION_PNG)


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


def training_files(split):
    """Every file a training run writes into --out-dir."""
    return (MODEL_FILE, CHECKPOINT_FILE, METRICS_FILE, REPORT_FILE, *training_figures(split))


def write_outputs(out_dir, args, runtime, model, progress, evaluation, timeline, train_set, eval_set, learned):
    """The model file, then the nine figures and report.html (unless --no-figures), and last metrics.json."""
    from companions.doubt.trust import log_trust, measure_trust
    from companions.reports import report

    dataset, split, config = DATASETS[args.dataset], evaluation.split, training_config(args)
    save_model(out_dir / MODEL_FILE, model, config, evaluation, doubt=learned.as_saved())
    costs = layers.layer_costs(model, args.batch_size)
    trust = measure_trust(model, learned, *eval_set, split)
    log_trust(trust)
    if args.no_figures:
        report.write_training_metrics(
            out_dir, config, costs, dataset, runtime, model, progress, evaluation, timeline, trust
        )
        logger.info("Wrote {}, {} and {} into {}/", MODEL_FILE, CHECKPOINT_FILE, METRICS_FILE, out_dir)
        return
    # The figures in two processes: a copy of this one draws the evaluation's three meanwhile.
    with report.drawn_beside(draw_evaluation_figures, out_dir, eval_set, evaluation, args.seed, dataset, trust):
        plot_samples(train_set, args.seed, "Training images (true label)", out_dir / TRAIN_IMAGES_PNG, dataset)
        heading = f"{split.capitalize()} images (true label)"
        plot_samples(eval_set, args.seed + 1, heading, out_dir / split_images_png(split), dataset)
        report.plot_training_curves(progress, split, out_dir / CURVES_PNG, report.training_measured_on(args))
        report.draw_inside_figures(out_dir, model, eval_set, split, dataset)
    network = describe_architecture(model, architecture(args))
    report.write_training_report(
        out_dir, config, network, costs, dataset, runtime, model, progress, evaluation, timeline, trust
    )
    logger.info(
        "Wrote {}, {}, {}, the figures and {} into {}/", MODEL_FILE, CHECKPOINT_FILE, METRICS_FILE, REPORT_FILE, out_dir
    )


# ----------------------------------------------------------------------------------------------
# The commands
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    """The command and its settings: from the command line, else the recipe, else SETTINGS."""
    return command_line.parse_args(argv, SETTINGS, RECIPES)


def train_command(args, after_epoch=None):
    runtime = start_runtime(args.device)
    try:
        return train(args, runtime, after_epoch)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# Every other command lives in companions/, in the folder of what a user does with it.
COMMAND_MODULES = {
    "evaluate": "companions.using.evaluate",
    "predict": "companions.using.predict",
    "serve": "companions.using.serve",
    "finetune": "companions.using.finetune",
    "export": "companions.sharing.export",
    "compare": "companions.experiments.compare",
    "search": "companions.experiments.search",
    "audit": "companions.auditing.audit",
}


def run_command(args):
    """The command's exit code. Commands other than train are imported only when they run."""
    if args.command == "train":
        return train_command(args)
    return importlib.import_module(COMMAND_MODULES[args.command]).command(args)


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
