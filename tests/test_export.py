"""Taking a model elsewhere: export to ONNX, checked with ONNX Runtime."""

import hashlib
import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import REPO, TEST_COUNT
from onnx import numpy_helper
from PIL import Image, ImageDraw

import mnist_recognition as app
from companions.reports import report
from companions.sharing import export as onnx_export
from companions.using import prepare, trained
from companions.using.trained import doubt_of

MNIST_DATA = app.DATASETS["mnist"]


def weights_digest(module):
    return hashlib.sha256(b"".join(tensor.numpy().tobytes() for tensor in module.state_dict().values())).hexdigest()


@pytest.fixture(autouse=True, scope="module")
def each_graph_exported_once():
    """torch.onnx.export takes seconds, and most tests here are about what export checks, writes and
    refuses: each model's graph, with its metadata, is exported once in this module."""
    graphs = {}
    export_graph = onnx_export.onnx_bytes

    def once(model, dataset, learned, metadata):
        detector = weights_digest(learned.detector) if learned.detector is not None else None
        key = (weights_digest(model), detector, learned.temperature, dataset.name, json.dumps(metadata, sort_keys=True))
        if key not in graphs:
            graphs[key] = export_graph(model, dataset, learned, metadata)
        return graphs[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onnx_export, "onnx_bytes", once)
        yield


def export(cli, checkpoint, out, data_dir):
    return cli("export", "--checkpoint", checkpoint, "--out", out, "--data-dir", data_dir)


@pytest.fixture(scope="module")
def exported(trained, synthetic_data, tmp_path_factory):
    """The trained fixture's model exported, checked on the synthetic test images: (path, log)."""
    out = tmp_path_factory.mktemp("exported") / "digits.onnx"
    code = app.main(
        [
            "export",
            "--checkpoint",
            str(trained[0] / "lenet5_mnist.pt"),
            "--out",
            str(out),
            "--data-dir",
            str(synthetic_data),
        ]
    )
    assert code == 0
    return out


def torch_probabilities(checkpoint, pixels, dataset=MNIST_DATA):
    """The PyTorch model's probabilities for 0..1 pixels, normalised here as training does, at the
    temperature its file holds."""
    model, payload = trained.load_trained_model(checkpoint, torch.device("cpu"))
    with torch.inference_mode():
        logits = model((pixels - dataset.mean) / dataset.std)
        return torch.softmax(logits / payload["doubt"]["temperature"], dim=1).numpy()


def metadata(path):
    return {prop.key: prop.value for prop in onnx.load(path).metadata_props}


# --- the file --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 7, 1000])
def test_the_file_takes_any_batch_and_agrees_with_pytorch(batch, exported, trained):
    pixels = torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(batch))
    session = onnxruntime.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    logits, probabilities = session.run(["logits", "probabilities"], {"image": pixels.numpy()})
    assert logits.shape == probabilities.shape == (batch, 10)
    expected = torch_probabilities(trained[0] / "lenet5_mnist.pt", pixels)
    assert (probabilities.argmax(1) == expected.argmax(1)).all()
    assert np.abs(probabilities - expected).max() <= 1e-5
    temperature = float(metadata(exported)["temperature"])
    np.testing.assert_allclose(
        torch.softmax(torch.from_numpy(logits) / temperature, 1).numpy(), probabilities, atol=1e-6
    )


@pytest.mark.slow
def test_the_file_carries_the_models_doubt(exported, trained):
    """The temperature and both thresholds in the metadata, and the detector's score as an output."""
    learned = doubt_of(torch.load(trained[0] / "lenet5_mnist.pt", weights_only=True), "model", torch.device("cpu"))
    props = metadata(exported)
    assert float(props["temperature"]) == pytest.approx(learned.temperature, rel=1e-8)
    assert float(props["unsure_below"]) == pytest.approx(learned.unsure_below, rel=1e-8)
    assert float(props["not_a_digit_above"]) == pytest.approx(learned.not_a_digit_above, rel=1e-8)
    pixels = torch.rand(20, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    session = onnxruntime.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    [scores] = session.run(["not_a_digit"], {"image": pixels.numpy()})
    with torch.inference_mode():
        expected = learned.detector((pixels - MNIST_DATA.mean) / MNIST_DATA.std).numpy()
    np.testing.assert_allclose(scores, expected, atol=1e-4)


@pytest.mark.slow
def test_the_graph_declares_a_dynamic_batch_of_28x28_pixels(exported):
    graph = onnx.load(exported).graph
    [image] = graph.input
    dims = image.type.tensor_type.shape.dim
    assert image.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert dims[0].dim_param and not dims[0].HasField("dim_value")  # a name, not a fixed size
    assert [dim.dim_value for dim in dims[1:]] == [1, 28, 28]
    assert [output.name for output in graph.output] == ["logits", "probabilities", "not_a_digit"]


@pytest.mark.slow
def test_the_file_is_self_contained_and_valid(exported):
    assert sorted(path.name for path in exported.parent.iterdir()) == ["digits.onnx"]  # no weights beside it
    model = onnx.load(exported, load_external_data=False)
    onnx.checker.check_model(model, full_check=True)
    parameters = sum(
        numpy_helper.to_array(tensor).size
        for tensor in model.graph.initializer
        if tensor.data_location != onnx.TensorProto.EXTERNAL
    )
    assert parameters >= 61_706  # every weight is inside (plus the normalisation's two constants, if kept apart)


@pytest.mark.slow
def test_the_metadata_says_how_to_use_the_model(exported, trained):
    props = metadata(exported)
    assert json.loads(props["dataset"]) == {"name": "mnist", "title": "MNIST", "classes": list("0123456789")}
    recorded = json.loads((trained[0] / "metrics.json").read_text())
    assert recorded["eval_images"] == TEST_COUNT  # so the export measured the same test images again
    assert props["test_accuracy"] == f"{recorded['eval_accuracy']:.3f}"
    assert props["recipe"] == "original"
    assert props["script_sha256"] == report.source_hash()
    assert "pixels 0..1" in props["input"] and "[N, 1, 28, 28]" in props["input"]
    # The preparation is the sentence in docs/export.md, word for word.
    page = " ".join((REPO / "docs" / "export.md").read_text().split())
    assert props["preparation"] in page


@pytest.mark.slow
def test_the_export_logs_the_comparison_on_the_test_images(trained, synthetic_data, tmp_path, cli):
    result = export(cli, trained[0] / "lenet5_mnist.pt", tmp_path / "model.onnx", synthetic_data)
    assert result.code == 0
    match = re.search(
        r"on the (\d+) test images in .*: 0 answers differ, largest difference in a probability "
        r"(\S+)",
        result.log,
    )
    assert match and int(match[1]) == TEST_COUNT and float(match[2]) <= 1e-5
    assert f"Wrote {tmp_path / 'model.onnx'}" in result.log


@pytest.mark.slow
def test_without_test_files_random_images_are_checked(trained, tmp_path, cli):
    result = export(cli, trained[0] / "lenet5_mnist.pt", tmp_path / "model.onnx", tmp_path / "no-data")
    assert result.code == 0
    assert f"on {onnx_export.RANDOM_CHECK_IMAGES} images of random pixels" in result.log
    recorded = json.loads((trained[0] / "metrics.json").read_text())["eval_accuracy"]
    assert metadata(tmp_path / "model.onnx")["test_accuracy"] == f"{recorded:.3f}"  # as training measured it


@pytest.mark.slow
def test_a_fashion_mnist_model_carries_its_class_names(fashion_trained, tmp_path, cli):
    data_dir, out_dir = fashion_trained
    assert export(cli, out_dir / "lenet5_mnist.pt", tmp_path / "fashion.onnx", data_dir).code == 0
    props = metadata(tmp_path / "fashion.onnx")
    assert json.loads(props["dataset"])["classes"] == list(app.DATASETS["fashion-mnist"].classes)
    assert props["preparation"] == prepare.describe(app.DATASETS["fashion-mnist"])
    # The graph normalises with Fashion-MNIST's statistics, not MNIST's.
    pixels = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    expected = torch_probabilities(out_dir / "lenet5_mnist.pt", pixels, app.DATASETS["fashion-mnist"])
    session = onnxruntime.InferenceSession(str(tmp_path / "fashion.onnx"), providers=["CPUExecutionProvider"])
    assert np.abs(session.run(["probabilities"], {"image": pixels.numpy()})[0] - expected).max() <= 1e-5


@pytest.mark.slow
def test_the_default_file_is_the_checkpoints_path_with_onnx(trained, synthetic_data, tmp_path, cli):
    checkpoint = tmp_path / "my_model.pt"
    checkpoint.write_bytes((trained[0] / "lenet5_mnist.pt").read_bytes())
    assert cli("export", "--checkpoint", checkpoint, "--data-dir", synthetic_data).code == 0
    assert (tmp_path / "my_model.onnx").is_file()


@pytest.mark.slow
def test_the_file_is_written_in_the_operator_set_the_docs_name(exported):
    assert [(entry.domain, entry.version) for entry in onnx.load(exported).opset_import] == [("", onnx_export.OPSET)]
    assert f"opset {onnx_export.OPSET})" in (REPO / "docs" / "export.md").read_text()


@pytest.mark.slow
def test_a_file_of_someone_elses_beside_the_export_is_left_alone(trained, synthetic_data, tmp_path, cli):
    """Only this program's own leftovers of a killed write are cleaned up, never another's .x.tmp."""
    folder = tmp_path / "some folder"
    folder.mkdir()
    for name in (".notes.tmp", ".x.tmp", "m.onnx.tmp"):
        (folder / name).write_text("someone else's")
    assert export(cli, trained[0] / "lenet5_mnist.pt", folder / "m.onnx", synthetic_data).code == 0
    assert sorted(path.name for path in folder.iterdir()) == [".notes.tmp", ".x.tmp", "m.onnx", "m.onnx.tmp"]
    assert all((folder / name).read_text() == "someone else's" for name in (".notes.tmp", ".x.tmp", "m.onnx.tmp"))


# --- refusals ----------------------------------------------------------------------------------------


def test_a_read_only_folder_is_one_line_and_nothing_is_written(trained, synthetic_data, tmp_path, cli, refusing):
    refusing.read_only(tmp_path)
    result = export(cli, trained[0] / "lenet5_mnist.pt", tmp_path / "m.onnx", synthetic_data)
    assert result.code == 2 and len(result.errors()) == 1 and "Traceback" not in result.log
    assert f"Cannot write into the output folder {tmp_path}: Permission denied" in result.errors()[0]
    assert list(tmp_path.iterdir()) == []


def with_altered_bias(original):
    """onnx_bytes, but the last layer's bias for class 3 raised by 5: a graph that disagrees with PyTorch."""

    def altered(*args):
        model = onnx.load_from_string(original(*args))
        [bias] = [tensor for tensor in model.graph.initializer if list(tensor.dims) == [10]]
        values = numpy_helper.to_array(bias).copy()
        values[3] += 5
        bias.CopyFrom(numpy_helper.from_array(values, bias.name))
        return model.SerializeToString()

    return altered


@pytest.mark.slow
def test_a_graph_that_disagrees_with_pytorch_is_refused_and_nothing_written(
    trained, synthetic_data, tmp_path, cli, monkeypatch
):
    monkeypatch.setattr(onnx_export, "onnx_bytes", with_altered_bias(onnx_export.onnx_bytes))
    out = tmp_path / "model.onnx"
    result = export(cli, trained[0] / "lenet5_mnist.pt", out, synthetic_data)
    assert result.code == 1
    [error] = result.errors()
    assert "Export refused" in error and f"Nothing was written to {out}" in error
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_difference_over_the_tolerance_is_refused(trained, synthetic_data, tmp_path, cli, monkeypatch):
    monkeypatch.setattr(onnx_export, "ONNX_TOLERANCE", 0.0)
    monkeypatch.setattr(
        onnx_export, "compare_with_onnx_runtime", lambda *args: (0, 3e-7)
    )  # same answers, tiny difference
    result = export(cli, trained[0] / "lenet5_mnist.pt", tmp_path / "model.onnx", synthetic_data)
    assert result.code == 1 and "largest difference in a probability is 3.00e-07" in result.errors()[0]
    assert not (tmp_path / "model.onnx").exists()


def test_an_output_folder_that_cannot_be_written_is_refused(trained, synthetic_data, tmp_path, cli):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    result = export(cli, trained[0] / "lenet5_mnist.pt", blocker / "model.onnx", synthetic_data)
    assert result.code == 2
    [error] = result.errors()
    assert "Cannot write into the output folder" in error


# --- the standalone example (examples/onnx_predict.py) ----------------------------------------------


@pytest.mark.slow
def test_the_onnx_example_reads_photos_as_predict_does(exported, trained, tmp_path, cli):
    """The README's way to use the file without torch gives predict's answers on the same photos."""
    import random

    from conftest import draw_digit

    example = load_example()
    paths = []
    for digit in range(10):
        photo = draw_digit(digit, random.Random(digit), size=240, ink=30, paper=225)  # dark ink on light paper
        paths.append(tmp_path / f"photo_{digit}.jpg")
        photo.save(paths[-1], quality=90)
    result = cli("predict", *paths, "--json", "--checkpoint", trained[0] / "lenet5_mnist.pt")
    assert result.code == 0
    predicted = {Path(entry["file"]).name: entry for entry in json.loads(result.stdout)}
    session = onnxruntime.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    for path in paths:
        name, _, _ = example.read(session, path)
        assert name == predicted[path.name]["name"], path.name
        # The two preparations see the same digit: on clean paper predict's extra steps have little to do.
        seen_by_predict = prepare.prepared_pixels(prepare.open_grayscale(path), MNIST_DATA)
        assert np.corrcoef(example.prepare(path).ravel(), seen_by_predict.ravel())[0, 1] > 0.9, path.name
    assert (
        sum(predicted[f"photo_{digit}.jpg"]["name"] == str(digit) for digit in range(10)) >= 6
    )  # most, by a small model


@pytest.mark.slow
def test_the_onnx_example_reads_the_datasets_own_images_as_predict_does(
    exported, trained, synthetic_data, tmp_path, cli
):
    """Light ink on a dark field, as the dataset's test images are when saved as they are."""
    images = np.fromfile(synthetic_data / "MNIST" / "raw" / "t10k-images-idx3-ubyte", np.uint8, offset=16)
    paths = []
    for index, pixels in enumerate(images.reshape(-1, 28, 28)[:10]):
        paths.append(tmp_path / f"test_{index}.png")
        Image.fromarray(pixels).save(paths[-1])
    result = cli("predict", *paths, "--json", "--checkpoint", trained[0] / "lenet5_mnist.pt")
    assert result.code == 0
    predicted = {Path(entry["file"]).name: entry["name"] for entry in json.loads(result.stdout)}
    example = load_example()
    session = onnxruntime.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    for path in paths:
        assert example.read(session, path)[0] == predicted[path.name], path.name
        seen_by_predict = prepare.prepared_pixels(prepare.open_grayscale(path), MNIST_DATA)
        assert np.corrcoef(example.prepare(path).ravel(), seen_by_predict.ravel())[0, 1] > 0.9, path.name


@pytest.mark.slow
def test_the_onnx_example_runs_as_its_docstring_says(exported, tmp_path):
    from conftest import run_process

    photo = tmp_path / "seven.png"
    Image.fromarray(255 - np.asarray(draw_seven())).save(photo)
    result = run_process([sys.executable, str(REPO / "examples" / "onnx_predict.py"), str(exported), str(photo)])
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(rf"{re.escape(str(photo))}: \d \d+\.\d%\n", result.stdout)


def load_example():
    spec = importlib.util.spec_from_file_location("onnx_predict", REPO / "examples" / "onnx_predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def draw_seven():
    image = Image.new("L", (200, 200), 0)
    ImageDraw.Draw(image).line([(40, 40), (160, 40), (90, 170)], fill=255, width=18)
    return image


# --- int8 (export --int8) ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantized(trained, synthetic_data, exported, tmp_path_factory):
    out = tmp_path_factory.mktemp("quantized") / "digits.int8.onnx"
    flags = ["--checkpoint", str(trained[0] / "lenet5_mnist.pt"), "--out", str(out), "--data-dir", str(synthetic_data)]
    assert app.main(["export", "--int8", *flags]) == 0
    return out


@pytest.mark.slow
def test_the_int8_file_is_a_third_of_the_size_or_less_and_answers_as_the_float_one(quantized, exported, synthetic_data):
    assert quantized.stat().st_size <= exported.stat().st_size / 3
    graph = onnx.load(quantized)
    kinds = {initializer.data_type for initializer in graph.graph.initializer}
    assert onnx.TensorProto.INT8 in kinds
    assert "int8" in metadata(quantized)["quantization"] and metadata(quantized)["temperature"]
    pixels, labels = app.pixel_split(synthetic_data, MNIST_DATA, False, None)
    outputs = {}
    for path in (exported, quantized):
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs[path] = session.run(["probabilities", "not_a_digit"], {"image": pixels.numpy()})
    accuracy = {path: (found[0].argmax(1) == labels.numpy()).mean() * 100 for path, found in outputs.items()}
    assert accuracy[quantized] >= accuracy[exported] - 0.1 * 3  # 300 images: within one answer
    assert np.abs(outputs[quantized][0] - outputs[exported][0]).max() < 0.2


@pytest.mark.slow
def test_the_int8_export_logs_its_accuracy_and_size(trained, synthetic_data, tmp_path, cli):
    result = cli("export", "--int8", "--checkpoint", trained[0] / "lenet5_mnist.pt", "--data-dir", synthetic_data,
                 "--out", tmp_path / "model.int8.onnx")  # fmt: skip
    assert result.code == 0
    assert re.search(
        r"int8 against float on the 300 test images .*: [\d.]+ % against [\d.]+ % test accuracy", result.log
    )
    assert re.search(r"int8: [\d,]+ bytes, 0\.\d\d of the float file's", result.log)


@pytest.mark.slow
def test_an_int8_file_that_loses_accuracy_is_refused_and_nothing_written(
    trained, synthetic_data, tmp_path, cli, monkeypatch
):
    monkeypatch.setattr(onnx_export, "INT8_TOLERANCE", -1.0)  # no int8 file gains a point over its float model
    result = cli("export", "--int8", "--checkpoint", trained[0] / "lenet5_mnist.pt", "--data-dir", synthetic_data,
                 "--out", tmp_path / "model.int8.onnx")  # fmt: skip
    assert result.code == 1 and "Export refused: the int8 file's test accuracy" in result.errors()[0]
    assert not (tmp_path / "model.int8.onnx").exists()


@pytest.mark.slow
def test_int8_without_the_training_images_is_one_line(trained, tmp_path, cli):
    result = cli("export", "--int8", "--checkpoint", trained[0] / "lenet5_mnist.pt", "--data-dir", tmp_path / "none")
    assert result.code == 2 and "calibrates on MNIST's training images" in result.errors()[0]


@pytest.mark.slow
def test_the_onnx_example_reads_the_int8_file(quantized, tmp_path):
    from conftest import run_process

    photo = tmp_path / "seven.png"
    Image.fromarray(255 - np.asarray(draw_seven())).save(photo)
    result = run_process([sys.executable, str(REPO / "examples" / "onnx_predict.py"), str(quantized), str(photo)])
    assert result.returncode == 0 and result.stdout.startswith(f"{photo}: "), result.stderr
