"""Model: LeNet-5 exactly as the original design has it."""

import torch

import mnist_recognition as app


def test_layer_shapes_and_parameter_count():
    model = app.LeNet5()
    assert app.parameter_count(model) == 61_706
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    assert shapes == {
        "features.0.weight": (6, 1, 5, 5),
        "features.0.bias": (6,),
        "features.3.weight": (16, 6, 5, 5),
        "features.3.bias": (16,),
        "classifier.0.weight": (120, 400),
        "classifier.0.bias": (120,),
        "classifier.2.weight": (84, 120),
        "classifier.2.bias": (84,),
        "classifier.4.weight": (10, 84),
        "classifier.4.bias": (10,),
    }
    assert isinstance(model.features[2], torch.nn.AvgPool2d)
    assert isinstance(model.features[5], torch.nn.AvgPool2d)
    assert [type(layer) for layer in model.features[1::3]] == [torch.nn.ReLU, torch.nn.ReLU]


def test_forward_gives_ten_logits_per_image_in_either_memory_format():
    model = app.new_model(seed=0, device=torch.device("cpu"))
    # The second convolution's weight: with one input channel the first one's plain layout
    # already counts as channels-last, so it could not tell the two apart.
    second_conv = model.features[3].weight
    assert second_conv.is_contiguous(memory_format=torch.channels_last) and not second_conv.is_contiguous()
    images = torch.randn(5, 1, 28, 28)
    assert model(images).shape == (5, 10)
    torch.manual_seed(0)
    reference = app.LeNet5()  # the plain memory format
    torch.testing.assert_close(model(images), reference(images))


def test_same_seed_same_initial_weights():
    first = app.new_model(3, torch.device("cpu")).state_dict()
    second = app.new_model(3, torch.device("cpu")).state_dict()
    other = app.new_model(4, torch.device("cpu")).state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not torch.equal(first["features.0.weight"], other["features.0.weight"])
