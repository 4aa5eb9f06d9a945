"""A trained model, as every command that uses one starts: the checkpoint read safely, LeNet-5 (or the
variant it records) rebuilt from it on the device, and the dataset it was trained on. Only those
commands import this module; it imports the training script, never the other way round."""

from loguru import logger

import mnist_recognition as trainer
from companions.doubt.verdicts import OLD_UNSURE_BELOW, Doubt, saved_doubt
from companions.training.datasets import DATASETS
from companions.training.devices import to_device
from companions.training.errors import CliError
from companions.training.files import check_weights, read_checkpoint


def load_trained_model(path, device):
    """(the model in a checkpoint file, rebuilt as its settings describe it and ready to answer on
    `device`; the checkpoint)."""
    payload = read_checkpoint(path)
    config = payload.get("config") if isinstance(payload.get("config"), dict) else {}
    try:
        model = trainer.LeNet5(**trainer.architecture(config))
    except (KeyError, TypeError, ValueError) as error:
        raise CliError(f"{path}: records a network this program cannot build ({error}).") from None
    check_weights(path, payload, model)
    model.load_state_dict(payload["model"])
    return to_device(model, device).eval(), payload


def dataset_name(payload):
    """The --dataset a checkpoint was trained on (older checkpoints: MNIST)."""
    return payload.get("config", {}).get("dataset", "mnist")


def trained_model(args, device):
    """(the model in --checkpoint on `device`, the checkpoint, its dataset). An explicit --dataset
    must agree with the checkpoint's."""
    model, payload = load_trained_model(args.checkpoint, device)
    trained_on = dataset_name(payload)
    if "dataset" in args.given and args.dataset != trained_on:
        raise CliError(
            f"{args.checkpoint} was trained on {trained_on}, not {args.dataset}. Leave out --dataset "
            f"(the checkpoint's is used), or give a checkpoint trained on {args.dataset}."
        )
    return model, payload, DATASETS[trained_on]


def doubt_of(payload, path, device):
    """What the model file knows of the model's doubt (companions/doubt/verdicts.py); a file made before
    there was any gets the old behaviour, and one line that says so."""
    learned = saved_doubt(payload, device, path)
    if learned is None:
        logger.warning(
            "{} holds no calibration and no 'not a digit' detector (an older model file): probabilities as the "
            "network gives them, 'not sure' below {}, never 'not a digit'. Train it again to have them.",
            path,
            OLD_UNSURE_BELOW,
        )
        return Doubt()
    return learned
