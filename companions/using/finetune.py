"""finetune: teach a trained model a person's own handwriting, from a folder of their labelled images.

    python mnist_recognition.py finetune --images my_digits/      # -> outputs/finetuned/lenet5_mnist.pt

It holds out a seeded share of the person's images (stratified by class), then trains from the
model on batches that mix the rest, oversampled and augmented as the `best` recipe augments, with
images of the model's own dataset, so that it learns the person without forgetting the dataset.
It logs the accuracy on the held-out images and on the dataset's test set, before and after, and
writes a normal model file (predict, serve, evaluate and export take it) and a metrics.json into a
folder of its own, by default finetuned/ beside the checkpoint: it never writes over the model it
started from, nor into a folder that another command wrote.
"""

import time

import torch
from loguru import logger

import mnist_recognition as trainer
from companions.doubt.kept_detector import detector_for
from companions.doubt.verdicts import learn_doubt
from companions.training import dataset_files, exclusions, files
from companions.training.adam import Adam
from companions.training.augment import augment_batch
from companions.training.devices import Runtime, pick_device
from companions.training.errors import CliError
from companions.training.files import METRICS_FILE, MODEL_FILE
from companions.using.evaluate import read_labelled
from companions.using.own_images import LabelledImages
from companions.using.trained import doubt_of, trained_model

FEW_IMAGES = 5  # a class with fewer is warned about: too few to learn from, or to measure
OWN_SHARE_OF_BATCH = 0.25  # the person's images in each batch; the rest are the dataset's
AUGMENT = ("affine", "elastic", "thickness")  # the `best` recipe's
WRITES = (MODEL_FILE, METRICS_FILE)


def command(args):
    started = time.perf_counter()
    runtime = Runtime(pick_device(args.device))
    model, payload, dataset = trained_model(args, runtime.device)
    learned_before = doubt_of(payload, args.checkpoint, runtime.device)
    found = read_labelled(args.images, dataset)
    indices, named = excluded(args, dataset)
    found = without_named(found, named, args.exclude)
    warn_about_small_classes(found, dataset)
    held_out = stratified_hold_out(found.labels, args.hold_out, args.seed)
    learn = torch.ones(len(found.labels), dtype=torch.bool)
    learn[held_out] = False
    own_train = (found.inputs[learn].to(runtime.device), found.labels[learn].to(runtime.device))
    own_held_out = (found.inputs[held_out].to(runtime.device), found.labels[held_out].to(runtime.device))
    logger.info(
        "{} of your images to learn from, {} held out to measure on (seed {})",
        int(learn.sum()),
        len(held_out),
        args.seed,
    )
    dataset_files.prepare_files(args.data_dir, dataset, allow_download=not args.no_download)
    train_set = exclusions.kept(trainer.normalised_split(args.data_dir, dataset, True, None, runtime.device), indices)
    if indices:
        logger.info("Left out {} of the dataset's training images that {} names", len(indices), args.exclude)
    test_set = trainer.normalised_split(args.data_dir, dataset, False, args.test_limit, runtime.device)
    out_dir = prepare_out_dir(args)

    own_before, test_before = measure(model, own_held_out, test_set, runtime)
    fine_tune(model, own_train, train_set, dataset, args, runtime)
    own_after, test_after = measure(model, own_held_out, test_set, runtime)
    logger.info(
        "Accuracy on the held-out images of yours: {} before, {} after", percent(own_before), percent(own_after)
    )
    logger.info(
        "Accuracy on the {} test images: {} before, {} after",
        len(test_set[1]),
        percent(test_before.accuracy),
        percent(test_after.accuracy),
    )
    before, after = (own_before, test_before.accuracy), (own_after, test_after.accuracy)
    # Fine-tuned, its probabilities are calibrated anew; a model that had a "not a digit" detector gets
    # the dataset's kept one (learned once per dataset), one without keeps none.
    detector = () if learned_before.detector is None else detector_for(args.data_dir, dataset, runtime.device)
    learned = learn_doubt(model, *train_set, dataset, args.seed, *detector)
    fine_tuned = what_was_done(args, found, dataset, held_out, before, after)
    save(out_dir, model, payload, test_after, fine_tuned, learned)
    logger.info("Wrote {} into {}/ in {:.1f} s", ", ".join(WRITES), out_dir, time.perf_counter() - started)
    logger.info("Use it with --checkpoint {}", out_dir / MODEL_FILE)
    return 1 if found.problems else 0


def what_was_done(args, found, dataset, held_out, before, after):
    """The fine-tuning as the model file and metrics.json record it: from what, on what, and the
    accuracies (on the held-out images of yours, on the test set) before and after."""
    return {
        "from": str(args.checkpoint),
        "images": str(args.images),
        "exclude": str(args.exclude) if args.exclude else None,
        "per_class": found.per_class(dataset),
        "held_out": len(held_out),
        "held_out_accuracy_before": before[0],
        "held_out_accuracy": after[0],
        "test_accuracy_before": before[1],
        "test_accuracy": after[1],
        "steps": args.steps,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "seed": args.seed,
    }


def save(out_dir, model, payload, test_after, fine_tuned, learned):
    """A model file as training writes one, with what it was fine-tuned on and its doubt; then metrics.json."""
    config = payload.get("config", {})
    doubt = learned.as_saved()
    files.save_model(out_dir / MODEL_FILE, model, config, test_after, fine_tuned=fine_tuned, doubt=doubt)
    files.write_json(out_dir / METRICS_FILE, {"command": "finetune", **fine_tuned, "doubt": learned.summary()})


def prepare_out_dir(args):
    """--out-dir, or by default finetuned/ beside the checkpoint; never the checkpoint's own file."""
    out_dir = args.out_dir or args.checkpoint.parent / "finetuned"
    model_path = out_dir / MODEL_FILE
    if model_path.exists() and model_path.resolve() == args.checkpoint.resolve():
        raise CliError(
            f"--out-dir {out_dir}: its {MODEL_FILE} is the --checkpoint that finetune starts from, "
            "and finetune never writes over it. Give another --out-dir (by default finetuned/ beside the checkpoint)."
        )
    return files.prepare_out_dir(out_dir, "finetune", WRITES)


def excluded(args, dataset):
    """(the training-split indices, the files) that --exclude names; none without it."""
    if not args.exclude:
        return [], set()
    return exclusions.exclusions_for(args.exclude, dataset, ("train", "images"))


def without_named(found, named, source):
    """The person's images but the files `named`; logs how many were left out."""
    if not named:
        return found
    keep = torch.tensor([path.resolve() not in named for path in found.files], dtype=torch.bool)
    logger.info("Left out {} of your images that {} names", int((~keep).sum()), source)
    if not keep.any():
        raise CliError(f"--exclude {source}: names every one of your images; nothing is left to learn from.")
    files_kept = [path for path, keep_it in zip(found.files, keep.tolist()) if keep_it]
    return LabelledImages(found.inputs[keep], found.labels[keep], files_kept, found.problems)


def warn_about_small_classes(found, dataset):
    few = {name: count for name, count in found.per_class(dataset).items() if count < FEW_IMAGES}
    if few:
        listed = ", ".join(f"{name} ({count})" for name, count in few.items())
        logger.warning(
            "Fewer than {} images of {}: too few to learn a class from, or to measure it", FEW_IMAGES, listed
        )


def stratified_hold_out(labels, share, seed):
    """Indices of a seeded `share` of each class's images, at least one where a class has two or
    more, never all of a class."""
    generator = torch.Generator().manual_seed(seed)
    held_out = []
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().squeeze(1)
        if len(members) < 2:
            continue
        count = min(len(members) - 1, max(1, round(share * len(members))))
        held_out += members[torch.randperm(len(members), generator=generator)[:count]].tolist()
    return sorted(held_out)


def fine_tune(model, own, dataset_split, dataset, args, runtime):
    """args.steps steps of Adam at args.lr: each batch a share of the person's images, drawn with
    replacement and augmented anew, and the rest drawn from the dataset's training images."""
    optimizer = Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.999))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    generator = torch.Generator().manual_seed(args.seed)
    own_count = max(1, round(OWN_SHARE_OF_BATCH * args.batch_size))
    model.train()
    for _ in range(args.steps):
        own_index = torch.randint(len(own[1]), (own_count,), generator=generator).to(runtime.device)
        data_index = torch.randint(len(dataset_split[1]), (args.batch_size - own_count,), generator=generator)
        data_index = data_index.to(runtime.device)
        own_images_now = augment_batch(
            own[0][own_index], AUGMENT, generator, own_count, slice(None), dataset.augment_limits
        )
        images = torch.cat([own_images_now, dataset_split[0][data_index]])
        labels = torch.cat([own[1][own_index], dataset_split[1][data_index]])
        trainer.train_step(model, optimizer, schedule, images, labels, len(labels))
    model.eval()


def measure(model, own_held_out, test_set, runtime):
    """(the accuracy on the person's held-out images, None where none are held out; the test set's Evaluation)."""
    own = trainer.evaluate(model, own_held_out, "held-out", runtime).accuracy if len(own_held_out[1]) else None
    return own, trainer.evaluate(model, test_set, "test", runtime)


def percent(accuracy):
    return "no images" if accuracy is None else f"{accuracy:.2f} %"
