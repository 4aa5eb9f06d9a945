"""Each layer's cost, computed from the model: LeNet-5's numbers as the original report works them out
by hand, and those of a network of other widths."""

import torch
import torch.nn as nn
from conftest import LENET5_LAYER_SHAPES

import mnist_recognition as app
from companions.training import layers

# The original report's sums: 156 + 2,416 + 48,120 + 10,164 + 850 parameters, and the multiply-adds
# of 6 maps of 28x28 from 5x5 windows, 16 maps of 10x10 from 6 x 5x5 windows, and the three matrices.
LENET5_PARAMETERS = {"conv1": 156, "pool1": 0, "conv2": 2416, "pool2": 0, "fc1": 48120, "fc2": 10164, "fc3": 850}
LENET5_MULTIPLY_ADDS = {
    "conv1": 6 * 28 * 28 * 25,
    "pool1": 0,
    "conv2": 16 * 10 * 10 * 6 * 25,
    "pool2": 0,
    "fc1": 400 * 120,
    "fc2": 120 * 84,
    "fc3": 84 * 10,
}


def test_lenet5s_layers_cost_what_the_original_report_computes_by_hand():
    costs = layers.layer_costs(app.LeNet5(), batch_size=64)
    assert [row["name"] for row in costs] == list(LENET5_PARAMETERS)
    assert {row["name"]: row["parameters"] for row in costs} == LENET5_PARAMETERS
    assert {row["name"]: row["multiply_adds"] for row in costs} == LENET5_MULTIPLY_ADDS
    shapes = {row["name"]: row["output_shape"] for row in costs}
    assert shapes == LENET5_LAYER_SHAPES
    assert costs[0]["activation_bytes"] == 64 * 6 * 28 * 28 * 4  # float32 maps of a whole batch
    assert layers.totals(costs) == {
        "parameters": 61_706,
        "multiply_adds": 416_520,
        "activation_bytes": 64 * 4 * (4704 + 1176 + 1600 + 400 + 120 + 84 + 10),
    }


class OtherWidths(nn.Module):
    """LeNet-5's shape with other widths, batch norm after each convolution and max pooling."""

    def __init__(self, c1=8, c2=20, f1=100, f2=50):
        super().__init__()
        # fmt: off
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 5, padding=2), nn.BatchNorm2d(c1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5), nn.BatchNorm2d(c2), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c2 * 25, f1), nn.ReLU(), nn.Dropout(0.3),
            nn.Linear(f1, f2), nn.ReLU(), nn.Linear(f2, 10),
        )
        # fmt: on

    def forward(self, images):
        return self.classifier(self.features(images))


def test_a_network_of_other_widths_is_costed_from_its_modules():
    model = OtherWidths()
    costs = {row["name"]: row for row in layers.layer_costs(model, batch_size=10)}
    assert list(costs) == ["conv1", "pool1", "conv2", "pool2", "fc1", "fc2", "fc3"]
    # A convolution's batch norm belongs to it: its scale and shift are parameters of that layer.
    assert costs["conv1"]["parameters"] == 8 * 25 + 8 + 2 * 8
    assert costs["conv2"]["parameters"] == 20 * 8 * 25 + 20 + 2 * 20
    assert [costs[name]["parameters"] for name in ("fc1", "fc2", "fc3")] == [500 * 100 + 100, 100 * 50 + 50, 510]
    assert costs["conv1"]["multiply_adds"] == 8 * 28 * 28 * 25
    assert costs["conv2"]["multiply_adds"] == 20 * 10 * 10 * 8 * 25
    assert costs["pool2"]["output_shape"] == [20, 5, 5]
    assert layers.totals(costs.values())["parameters"] == sum(p.numel() for p in model.parameters())


def test_costing_a_model_leaves_it_and_the_random_numbers_as_they_were():
    model = OtherWidths().train()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    rng = torch.get_rng_state()
    layers.layer_costs(model, batch_size=64)
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


def test_the_logged_table_has_a_line_per_layer_and_the_totals():
    lines = layers.table_lines(layers.layer_costs(app.LeNet5(), batch_size=64), batch_size=64)
    assert "activations (batch 64)" in lines[0] and len(lines) == 1 + 7 + 1
    assert lines[1].split()[:4] == ["conv1", "6x28x28", "156", "117,600"]
    assert lines[-1].split()[:3] == ["total", "61,706", "416,520"]
