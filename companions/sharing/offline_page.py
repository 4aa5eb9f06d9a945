"""export --html: serve's page as one file that holds the model and runs it in the browser, offline.

    python mnist_recognition.py export --html      # -> outputs/lenet5_mnist.html

The file is companions/using/page.html as serve gives it, with a Content-Security-Policy that allows no
request at all, the weights (the classifier's and the detector's, base64 float32), the temperature
and thresholds, and companions/sharing/offline_page.js, which answers the page's questions where serve's
POST /predict would: the same digits found in the image, preparation, forward pass, verdicts and
inside view.
"""

import base64
import json
from pathlib import Path

import torch.nn as nn

from companions.training.errors import CliError
from companions.training.layers import named_layers
from companions.using import numbers, predict
from companions.using.serve import page_for

PAGE_SCRIPT = Path(__file__).with_name("offline_page.js")
# Inline code and styles, images from data: and blob: URLs; nothing else, and no request of any kind.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; "
    "connect-src 'none'; form-action 'none'; base-uri 'none'"
)
GENERATOR = "mnist_recognition.py export --html"  # the mark of a file export made (and may replace)


def as_base64(tensor):
    return base64.b64encode(tensor.detach().float().contiguous().cpu().numpy().tobytes()).decode()


def module_entry(module):
    """One module as offline_page.js runs it; None for one that does nothing at inference (dropout)."""
    if isinstance(module, nn.Conv2d) and module.stride == (1, 1) and module.padding[0] == module.padding[1]:
        shape = {"in": module.in_channels, "out": module.out_channels, "size": module.kernel_size[0]}
        weights = {"weight": as_base64(module.weight), "bias": as_base64(module.bias)}
        return {"type": "conv", **shape, "padding": module.padding[0], **weights}
    if isinstance(module, nn.BatchNorm2d):  # as it computes in evaluation: a scale and a shift per channel
        scale = module.weight / (module.running_var + module.eps).sqrt()
        shift = module.bias - module.running_mean * scale
        return {"type": "batch_norm", "scale": as_base64(scale), "shift": as_base64(shift)}
    if isinstance(module, nn.Linear):
        return {"type": "linear", "in": module.in_features, "out": module.out_features,
                "weight": as_base64(module.weight), "bias": as_base64(module.bias)}  # fmt: skip
    if isinstance(module, (nn.AvgPool2d, nn.MaxPool2d)) and module.kernel_size in (2, (2, 2)):
        return {"type": "avg_pool" if isinstance(module, nn.AvgPool2d) else "max_pool"}
    simple = {nn.ReLU: {"type": "relu"}, nn.Tanh: {"type": "tanh"}, nn.Flatten: {"type": "flatten"}}
    if type(module) in simple:
        return simple[type(module)]
    if isinstance(module, nn.LeakyReLU):
        return {"type": "leaky_relu", "slope": module.negative_slope}
    if isinstance(module, nn.ELU):
        return {"type": "elu", "alpha": module.alpha}
    if isinstance(module, nn.Dropout):
        return None
    raise CliError(f"export --html: the page cannot run a {type(module).__name__} layer.")


def network_entries(network):
    """The network's modules in forward order; each layer's first module (its convolution, pooling
    or linear module) carries the layer's name, so that the page shows its output as serve does."""
    names = {id(module): name for name, module, _ in named_layers(network)}
    entries = []
    for module in network.modules():
        if list(module.children()):
            continue
        entry = module_entry(module)
        if entry is not None:
            entries.append(entry | ({"name": names[id(module)]} if id(module) in names else {}))
    return entries


def model_json(model, learned, dataset):
    """Everything offline_page.js needs of the model, as JSON."""
    return json.dumps(
        {
            "classifier": network_entries(model),
            "detector": network_entries(learned.detector.layers) if learned.detector is not None else None,
            "temperature": learned.temperature,
            "unsure_below": learned.unsure_below,
            "not_a_digit_above": learned.not_a_digit_above,
            "mean": dataset.mean,
            "std": dataset.std,
            "kind": dataset.image_kind,
            "stroke_widths": list(dataset.stroke_widths) if dataset.stroke_widths else None,
            "numbers": number_settings(),
        },
        separators=(",", ":"),
    )


def number_settings():
    """What reading a whole number goes by (companions/using/numbers.py, and the judge's in predict.py)."""
    settings = {name: value for name, value in vars(numbers).items() if name.isupper()}
    return settings | {"DETECTOR_WEIGHT": predict.DETECTOR_WEIGHT, "DETECTOR_SLACK": predict.DETECTOR_SLACK}


def page_html(model, learned, dataset, description):
    """The whole file: serve's page, with the policy, the model and the code that runs it."""
    head = (
        f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">'
        f'<meta name="generator" content="{GENERATOR}">'
    )
    model_script = f"<script>const MODEL = {model_json(model, learned, dataset)};</script>"
    code = f"<script>\n{PAGE_SCRIPT.read_text(encoding='utf-8')}</script>"
    page = page_for(description, dataset, collecting=False)
    return page.replace("<!--head-->", head, 1).replace("<!--offline-->", model_script + code, 1)


def made_by_export(path):
    """Whether the file at `path` is a page that export --html wrote (so that it may be replaced)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            return f'<meta name="generator" content="{GENERATOR}">' in file.read(4096)
    except OSError:
        return False
