"""LeNet-5's layers by the names the literature gives them (conv1, pool1, conv2, pool2, fc1, fc2, fc3;
a deeper network's further convolutions in a stage are conv1b, conv1c, ...), and what each one
costs, computed from the model itself: its output's shape, its parameters, its multiply-adds per
image and the memory its output takes at a batch size (what backprop keeps for the backward pass).

A layer is a convolution, a pooling or a linear module; the modules that follow it before the next
layer (its activation) belong to it.
"""

import copy
import string

import torch
import torch.nn as nn

LAYER_KINDS = ((nn.Conv2d, "conv"), ((nn.AvgPool2d, nn.MaxPool2d), "pool"), (nn.Linear, "fc"))


def kind_of(module):
    return next((kind for types, kind in LAYER_KINDS if isinstance(module, types)), None)


def named_layers(model):
    """[(name, its module, the qualified names of the modules that belong to it)] in forward order."""
    layers, counts, in_stage = [], {}, 0  # in_stage: the convolutions since the last pooling
    for qualified, module in model.named_modules():
        if list(module.children()):
            continue  # a container: its modules come one by one
        kind = kind_of(module)
        if kind is None:
            if layers:
                layers[-1][2].append(qualified)
            continue
        if kind == "conv" and in_stage:  # a further convolution of the stage: conv1b, conv1c, ...
            name = f"conv{counts['conv']}{string.ascii_lowercase[in_stage]}"
        else:
            counts[kind] = counts.get(kind, 0) + 1
            name = f"{kind}{counts[kind]}"
        in_stage = in_stage + 1 if kind == "conv" else 0
        layers.append((name, module, [qualified]))
    return layers


def layer_costs(model, batch_size, image_shape=(1, 28, 28)):
    """One row per layer: name, output_shape (of one image), parameters, multiply_adds (per image),
    activation_bytes (its output for a whole batch of `batch_size`, in the model's dtype)."""
    probe = copy.deepcopy(model).cpu().eval()  # the model itself stays untouched: no batch-norm statistics, no RNG
    modules = dict(probe.named_modules())
    shapes = {}  # qualified name: (input shape, output shape) for one image

    def record_shapes(qualified):
        def hook(module, inputs, output):
            shapes[qualified] = (list(inputs[0].shape), list(output.shape))

        return hook

    hooks = [module.register_forward_hook(record_shapes(name)) for name, module in modules.items() if name]
    try:
        with torch.no_grad():
            probe(torch.zeros(1, *image_shape))
    finally:
        for hook in hooks:
            hook.remove()
    element_bytes = next(probe.parameters()).element_size()
    rows = []
    for name, _, owned in named_layers(probe):
        shape = shapes[owned[0]][1][1:]
        rows.append(
            {
                "name": name,
                "output_shape": shape,
                "parameters": sum(p.numel() for q in owned for p in modules[q].parameters(recurse=False)),
                "multiply_adds": sum(multiply_adds(modules[q], *shapes[q]) for q in owned if q in shapes),
                "activation_bytes": batch_size * element_bytes * int(torch.Size(shape).numel()),
            }
        )
    return rows


def multiply_adds(module, input_shape, output_shape):
    """A convolution's or a linear layer's multiply-adds for the shapes it saw, by torch's own flop
    counter's formulas (which count two flops a multiply-add); 0 for any other module. Its formulas
    only: running the counter itself (FlopCounterMode) imports torch._dynamo, which takes seconds."""
    from torch.utils import flop_counter  # imported where costs are wanted: it takes a while

    if isinstance(module, nn.Conv2d):
        return flop_counter.conv_flop_count(input_shape, list(module.weight.shape), output_shape) // 2
    if isinstance(module, nn.Linear):
        return (
            flop_counter.mm_flop([input_shape[0], module.in_features], [module.in_features, module.out_features]) // 2
        )
    return 0


def totals(rows):
    return {key: sum(row[key] for row in rows) for key in ("parameters", "multiply_adds", "activation_bytes")}


def kibibytes(count):
    return f"{count / 1024:,.1f} KiB"


def rows_as_text(rows):
    """Each row, then the totals, as (layer, output, parameters, multiply-adds, activations) text."""
    return [
        (
            row["name"],
            "x".join(str(size) for size in row["output_shape"]),
            f"{row['parameters']:,}",
            f"{row['multiply_adds']:,}",
            kibibytes(row["activation_bytes"]),
        )
        for row in [*rows, {"name": "total", "output_shape": [], **totals(rows)}]
    ]


def table_lines(rows, batch_size):
    """The table as lines of text, with a totals line, for the log."""
    memory = f"activations (batch {batch_size})"
    lines = [f"{'layer':<6} {'output':>9} {'parameters':>11} {'multiply-adds':>14} {memory:>26}"]
    for name, shape, parameters, multiply_adds, activations in rows_as_text(rows):
        lines.append(f"{name:<6} {shape:>9} {parameters:>11} {multiply_adds:>14} {activations:>26}")
    return lines
