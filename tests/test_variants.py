"""The report's variants of LeNet-5 as flags: each one builds the network it names, trains, resumes
bit-exactly, and loads in every command that uses a model; the default stays the original design."""

import json
import random

import pytest
import torch
import torch.nn as nn
from conftest import QUICK, QUICK_WITH_FIGURES, assert_same_weights, draw_digit, interrupt_at

import mnist_recognition as app
from companions.training.layers import named_layers
from companions.using import serve
from companions.using.trained import load_trained_model

# Each changes the network: it must load in every command that uses a model.
NETWORK_VARIANTS = {
    "max pooling": ("--pool", "max"),
    "leaky_relu": ("--activation", "leaky_relu"),
    "elu": ("--activation", "elu"),
    "tanh": ("--activation", "tanh"),
    "batch norm": ("--batch-norm",),
    "dropout": ("--dropout", "0.3"),
    "widths": ("--widths", "8,20,100,50"),
    "depth": ("--depth", "1"),
    "depth with batch norm and max pooling": ("--depth", "2", "--batch-norm", "--pool", "max"),
}
# Each changes only how LeNet-5 is trained.
TRAINING_VARIANTS = {
    "adamw": ("--optimizer", "adamw", "--weight-decay", "0.05"),
    "sgd with momentum": ("--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.05"),
    "rmsprop": ("--optimizer", "rmsprop", "--momentum", "0.5", "--lr", "0.0005"),
    "adagrad": ("--optimizer", "adagrad", "--lr", "0.02"),
    "adam with weight decay": ("--weight-decay", "0.001"),
    "step schedule": ("--schedule", "step"),
}
VARIANTS = {**NETWORK_VARIANTS, **TRAINING_VARIANTS}
# Ten batches of 32 an epoch: enough to stop in the middle of the second and resume.
SMALL_RUN = (*QUICK_WITH_FIGURES, "--train-limit", 320)


def module_types(model):
    return [type(module).__name__ for module in model.modules() if not list(module.children())]


def test_the_default_network_is_the_original_design_module_for_module():
    assert module_types(app.LeNet5()) == [
        *("Conv2d", "ReLU", "AvgPool2d", "Conv2d", "ReLU", "AvgPool2d"),
        *("Linear", "ReLU", "Linear", "ReLU", "Linear"),
    ]
    arguments = app.architecture(app.parse_args([]))
    assert arguments == {
        "widths": (6, 16, 120, 84),
        "pool": "avg",
        "activation": "relu",
        "batch_norm": False,
        "dropout": 0.0,
        "depth": 0,
    }
    assert app.describe_architecture(app.LeNet5(**arguments), arguments) == "LeNet-5 (61,706 parameters)"


def test_each_variant_flag_builds_the_network_it_names():
    args = app.parse_args(
        ["--pool", "max", "--activation", "elu", "--batch-norm", "--dropout", "0.3", "--widths", "8,20,100,50"]
    )
    model = app.LeNet5(**app.architecture(args))
    assert module_types(model) == [
        *("Conv2d", "BatchNorm2d", "ELU", "MaxPool2d", "Conv2d", "BatchNorm2d", "ELU", "MaxPool2d"),
        *("Linear", "ELU", "Dropout", "Linear", "ELU", "Dropout", "Linear"),
    ]
    assert [model.features[0].out_channels, model.features[4].out_channels] == [8, 20]
    assert [model.classifier[0].out_features, model.classifier[3].out_features] == [100, 50]
    assert model.classifier[2].p == 0.3
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    description = app.describe_architecture(model, app.architecture(args))
    assert description.startswith("LeNet-5, widths 8,20,100,50, pool max, activation elu, batch_norm, dropout 0.3 (")


def test_depth_adds_3x3_convolutions_to_each_stage_before_its_pooling():
    model = app.LeNet5(**app.architecture(app.parse_args(["--depth", "2", "--batch-norm"])))
    assert module_types(model.features) == [
        *("Conv2d", "BatchNorm2d", "ReLU", *("Conv2d", "BatchNorm2d", "ReLU") * 2, "AvgPool2d"),
        *("Conv2d", "BatchNorm2d", "ReLU", *("Conv2d", "BatchNorm2d", "ReLU") * 2, "AvgPool2d"),
    ]
    extra = [module for module in model.features if isinstance(module, nn.Conv2d)][1]
    assert (extra.kernel_size, extra.padding, extra.in_channels, extra.out_channels) == ((3, 3), (1, 1), 6, 6)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("depth", ["-1", "9", "two"])
def test_a_depth_out_of_range_is_refused_by_the_parser(depth, capsys):
    with pytest.raises(SystemExit) as refused:
        app.parse_args(["--depth", depth])
    assert refused.value.code == 2 and "--depth" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, expected",
    [
        (("--optimizer", "adamw", "--weight-decay", "0.05"), (torch.optim.AdamW, {"weight_decay": 0.05})),
        (("--optimizer", "sgd", "--momentum", "0.9"), (torch.optim.SGD, {"momentum": 0.9})),
        (("--optimizer", "rmsprop", "--momentum", "0.5"), (torch.optim.RMSprop, {"momentum": 0.5})),
        (("--optimizer", "adagrad", "--lr", "0.02"), (torch.optim.Adagrad, {"lr": 0.02})),
        (
            (
                "--weight-decay",
                "0.001",
            ),
            (torch.optim.Adam, {"weight_decay": 0.001}),
        ),
        ((), (app.Adam, {"lr": 1e-3})),
    ],
)
def test_the_optimizer_is_torch_optims_with_the_settings_given(flags, expected):
    optimizer = app.new_optimizer(app.LeNet5(), app.parse_args(list(flags)))
    kind, settings = expected
    assert type(optimizer) is kind
    assert {name: optimizer.param_groups[0][name] for name in settings} == settings


def test_momentum_for_an_optimizer_without_one_is_refused_in_one_line(synthetic_data, tmp_path, cli):
    result = cli(*QUICK, "--momentum", "0.9", "--data-dir", synthetic_data, "--out-dir", tmp_path / "out")
    assert result.code == 2 and not (tmp_path / "out").exists()
    [error] = result.errors()
    assert "--momentum is for --optimizer sgd or rmsprop, not adam" in error


def test_the_step_schedule_divides_the_rate_by_ten_after_half_and_three_quarters_of_the_steps():
    args = app.parse_args(["--schedule", "step", "--epochs", "4", "--lr", "0.1"])
    optimizer = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=args.lr)
    schedule = app.new_schedule(optimizer, args, steps_per_epoch=10)
    rates = []
    for _ in range(40):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[:20] == [0.1] * 20
    assert rates[20:30] == pytest.approx([0.01] * 10) and rates[30:] == pytest.approx([0.001] * 10)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_a_variant_trains_and_resumes_bit_exactly(variant, synthetic_data, tmp_path, monkeypatch, cli):
    flags = (*SMALL_RUN, *VARIANTS[variant], "--no-figures", "--data-dir", synthetic_data)
    assert cli(*flags, "--out-dir", tmp_path / "whole").code == 0
    interrupt_at(monkeypatch, epoch=2, batch=9)
    assert cli(*flags, "--out-dir", tmp_path / "resumed").code == 130
    monkeypatch.undo()
    assert cli(*flags, "--out-dir", tmp_path / "resumed", "--resume").code == 0
    assert_same_weights(tmp_path / "whole", tmp_path / "resumed")


@pytest.mark.slow
@pytest.mark.parametrize("variant", NETWORK_VARIANTS)
def test_a_network_variant_loads_in_every_command(variant, synthetic_data, tmp_path, cli):
    figures = () if "--depth" in NETWORK_VARIANTS[variant] else ("--no-figures",)  # the filters of a deeper network
    flags = (*SMALL_RUN, *NETWORK_VARIANTS[variant], *figures, "--data-dir", synthetic_data)
    assert cli(*flags, "--out-dir", tmp_path / "whole").code == 0
    checkpoint = tmp_path / "whole" / "lenet5_mnist.pt"
    recorded = json.loads((tmp_path / "whole" / "metrics.json").read_text())["eval_accuracy"]
    evaluated = cli(
        "evaluate", "--checkpoint", checkpoint, "--data-dir", synthetic_data, "--no-download", "--device", "cpu"
    )
    assert evaluated.code == 0 and f"test images: {recorded:.3f} %" in evaluated.log
    digit = tmp_path / "digit.png"
    draw_digit(3, random.Random(0), size=200, ink=0, paper=255).save(digit)
    predicted = cli("predict", digit, "--json", "--device", "cpu", "--checkpoint", checkpoint)
    assert predicted.code == 0
    server = serve.start_server(
        app.parse_args(["serve", "--checkpoint", str(checkpoint), "--port", "0", "--device", "cpu"])
    )
    try:
        served = server.prediction_for(digit.read_bytes(), with_layers=True)
    finally:
        server.server_close()
    assert served["class"] == json.loads(predicted.stdout)[0]["class"]
    model, _ = load_trained_model(checkpoint, torch.device("cpu"))
    names = [name for name, _, _ in named_layers(model)]
    assert [layer["name"] for layer in served["layers"]] == ["input", *names]  # the inside view, every layer
    if "--depth" in flags:
        assert names[:3] == ["conv1", "conv1b", "conv1c" if "2" in flags else "pool1"]
        figure = tmp_path / "layers.png"
        assert cli("predict", digit, "--layers", figure, "--device", "cpu", "--checkpoint", checkpoint).code == 0
        assert figure.stat().st_size > 10_000
    exported = cli("export", "--checkpoint", checkpoint, "--data-dir", synthetic_data, "--out", tmp_path / "model.onnx")
    assert exported.code == 0 and "0 answers differ" in exported.log  # ONNX Runtime within 1e-5 of PyTorch


@pytest.mark.slow
def test_a_checkpoint_records_its_network_and_one_that_does_not_fit_it_is_refused(synthetic_data, tmp_path, cli):
    flags = (*QUICK, "--epochs", 1, "--train-limit", 128, "--pool", "max", "--batch-norm", "--data-dir", synthetic_data)
    assert cli(*flags, "--out-dir", tmp_path).code == 0
    payload = torch.load(tmp_path / "lenet5_mnist.pt", weights_only=True)
    assert {name: payload["config"][name] for name in app.ARCHITECTURE} == {
        "widths": [6, 16, 120, 84],
        "pool": "max",
        "activation": "relu",
        "batch_norm": True,
        "dropout": 0.0,
        "depth": 0,
    }
    payload["config"]["batch_norm"] = False  # settings that no longer describe the weights
    torch.save(payload, tmp_path / "altered.pt")
    result = cli("predict", tmp_path / "altered.pt", "--checkpoint", tmp_path / "altered.pt")
    assert result.code == 2
    [error] = result.errors()
    assert "does not hold the weights of the network its settings describe" in error and "features.1." in error


@pytest.mark.slow
def test_a_checkpoint_written_before_the_variants_loads_and_resumes_as_lenet5(synthetic_data, tmp_path, cli):
    flags = (
        *QUICK_WITH_FIGURES,
        "--epochs",
        2,
        "--train-limit",
        128,
        "--data-dir",
        synthetic_data,
        "--out-dir",
        tmp_path,
    )
    assert cli(*flags[:-4], "--epochs", 1, *flags[-4:]).code == 0
    for name in ("lenet5_mnist.pt", "checkpoint.pt"):  # as an older version wrote them: no network settings
        payload = torch.load(tmp_path / name, weights_only=True)
        for setting in (*app.ARCHITECTURE, "optimizer", "momentum", "weight_decay"):
            del payload["config"][setting]
        torch.save(payload, tmp_path / name)
    assert cli("predict", tmp_path / "train_images.png", "--checkpoint", tmp_path / "lenet5_mnist.pt").code == 0
    assert cli(*flags, "--resume").code == 0


def test_no_figures_writes_the_model_checkpoint_and_metrics_only(synthetic_data, tmp_path, cli):
    result = cli(*QUICK, "--epochs", 1, "--train-limit", 128, "--data-dir", synthetic_data, "--out-dir", tmp_path)
    assert result.code == 0
    assert {path.name for path in tmp_path.iterdir()} == {"lenet5_mnist.pt", "checkpoint.pt", "metrics.json"}
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["command"] == "train" and metrics["layers"]["totals"]["parameters"] == 61_706


def test_a_network_too_big_to_build_is_refused_in_one_line(synthetic_data, tmp_path, cli):
    flags = ("--epochs", 1, "--train-limit", 64, "--no-download", "--device", "cpu")
    result = cli("--widths", "100000,100000,1,1", "--data-dir", synthetic_data, *flags, "--out-dir", tmp_path)
    assert result.code == 2
    [line] = result.log.strip().splitlines()[-1:]
    assert "--widths 100000,100000,1,1: the network would have 250,005,200,023 parameters, 931.3 GiB" in line
    assert "Traceback" not in result.log
