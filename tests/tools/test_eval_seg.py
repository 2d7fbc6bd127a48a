"""tools/eval_seg.py against a direct numpy computation on tiny PNG sets."""

import contextlib
import io
import json

import cv2
import numpy as np
import pytest

from tests.tools import loader
from tests.tools.test_eval_det import _check_page

NAMES = ["__background__", "circle", "square"]
KEYS = ["a", "b", "c", "sub/d"]  # one in a subfolder: pairs are matched by relative path


def _label_sets(seed=0):
    rng = np.random.default_rng(seed)
    labels, predictions = {}, {}
    for key in KEYS:
        label = rng.integers(0, 3, (12, 16)).astype(np.uint8)
        label[:2] = 255  # ignored rows
        prediction = np.where(rng.random(label.shape) < 0.7, label, rng.integers(0, 3, label.shape)).astype(np.uint8)
        prediction[prediction == 255] = 0
        labels[key], predictions[key] = label, prediction
    labels["c"][2:] = 1  # an image of one class only
    return labels, predictions


def _write(folder, arrays, suffix):
    for key, array in arrays.items():
        path = folder / f"{key}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), array)


@pytest.fixture
def files(tmp_path):
    labels, predictions = _label_sets()
    _write(tmp_path / "labels", labels, ".png")
    _write(tmp_path / "predictions", predictions, "_mask.png")  # as tools/infer_seg.py --save-masks names them
    _write(tmp_path / "predictions", {key: np.zeros((12, 16, 3), np.uint8) for key in KEYS}, "_overlay.png")
    _write(tmp_path / "images", {key: np.full((12, 16, 3), 90, np.uint8) for key in KEYS}, ".jpg")
    return tmp_path, labels, predictions


def _run(*arguments):
    """eval_seg in this process; returns the exit status and stderr."""
    main = loader.load_tool("eval_seg").main
    stderr = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
        status = main([str(argument) for argument in arguments])
    return status, stderr.getvalue()


def _direct_metrics(labels, predictions, num_classes=3):
    confusion = np.zeros((num_classes, num_classes), np.int64)
    per_image = []
    for key in sorted(labels):
        label, prediction = labels[key].ravel(), predictions[key].ravel()
        keep = label != 255
        image = np.zeros_like(confusion)
        np.add.at(image, (label[keep], prediction[keep]), 1)
        confusion += image
        per_image.append(image)

    def metrics(matrix):
        tp, gt, pred = np.diag(matrix), matrix.sum(1), matrix.sum(0)
        with np.errstate(invalid="ignore"):
            iou, acc = tp / (gt + pred - tp), tp / gt
        return iou, acc, np.nanmean(iou), tp.sum() / gt.sum(), np.nanmean(acc)

    return confusion, metrics(confusion), [metrics(m)[2] for m in per_image]


def test_metrics_equal_a_direct_computation(files):
    root, labels, predictions = files
    status, _ = _run("--predictions", root / "predictions", "--labels", root / "labels", "--class-names", *NAMES,
                     "--output", root / "metrics.json")  # fmt: skip
    assert status == 0
    metrics = json.loads((root / "metrics.json").read_text())
    confusion, (iou, acc, miou, pixel_acc, mean_acc), per_image = _direct_metrics(labels, predictions)
    assert metrics["confusion"]["counts"] == confusion.tolist()
    assert metrics["summary"] == pytest.approx({"mIoU": miou, "pixel_acc": pixel_acc, "mean_acc": mean_acc})
    assert [metrics["per_class"][n]["IoU"] for n in NAMES] == pytest.approx(iou.tolist())
    assert [metrics["per_class"][n]["acc"] for n in NAMES] == pytest.approx(acc.tolist())
    assert metrics["per_image"]["names"] == sorted(KEYS) and metrics["per_image"]["mIoU"] == pytest.approx(per_image)
    assert [row["name"] for row in metrics["worst_images"]] == [sorted(KEYS)[i] for i in np.argsort(per_image)]


def test_reduce_zero_label_reads_label_k_as_class_k_minus_1(files):
    root, labels, predictions = files
    shifted = {key: np.where(label == 255, 0, label + 1).astype(np.uint8) for key, label in labels.items()}
    _write(root / "ade", shifted, ".png")
    status, _ = _run("--predictions", root / "predictions", "--labels", root / "ade", "--num-classes", 3,
                     "--reduce-zero-label", "--output", root / "metrics.json")  # fmt: skip
    assert status == 0
    _, (_, _, miou, pixel_acc, _), _ = _direct_metrics(labels, predictions)
    summary = json.loads((root / "metrics.json").read_text())["summary"]
    assert summary["mIoU"] == pytest.approx(miou) and summary["pixel_acc"] == pytest.approx(pixel_acc)


def test_identical_predictions_give_the_interval_1_1(files):
    root, labels, _ = files
    perfect = {key: np.where(label == 255, 0, label).astype(np.uint8) for key, label in labels.items()}
    _write(root / "perfect", perfect, "_mask.png")  # right wherever a pixel counts
    status, _ = _run("--predictions", root / "perfect", "--labels", root / "labels", "--num-classes", 3,
                     "--bootstrap", 50, "--output", root / "metrics.json")  # fmt: skip
    assert status == 0
    bootstrap = json.loads((root / "metrics.json").read_text())["bootstrap"]
    assert bootstrap["summary"] == {"mIoU": [1.0, 1.0], "pixel_acc": [1.0, 1.0], "mean_acc": [1.0, 1.0]}


def test_report_page_is_offline_and_shows_its_own_files(files):
    root, _, _ = files
    folder = root / "report"
    status, _ = _run("--predictions", root / "predictions", "--labels", root / "labels", "--class-names", *NAMES,
                     "--report", folder, "--images", root / "images", "--bootstrap", 20, "--num-worst", 2)  # fmt: skip
    assert status == 0
    text, images = _check_page(folder)
    assert {"confusion_matrix.png", "per_class.png", "worst_1.png", "worst_2.png"} == set(images)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["bootstrap"]["draws"] == 20 and f"{metrics['summary']['mIoU']:.4f}" in text


@pytest.mark.parametrize(
    ("remove", "message"),
    [("predictions/b_mask.png", "1 label file(s) without a prediction"), ("labels/sub/d.png", "sub/d_mask.png")],
)
def test_a_file_without_its_pair_is_an_error_naming_it(files, remove, message):
    root, _, _ = files
    (root / remove).unlink()
    status, stderr = _run("--predictions", root / "predictions", "--labels", root / "labels", "--num-classes", 3)
    assert status == 2 and message in stderr and stderr.startswith("eval_seg: error:")
    if remove.startswith("predictions"):
        assert "labels/b.png" in stderr


def test_bad_values_and_sizes_name_the_file(files):
    root, _, _ = files
    cv2.imwrite(str(root / "predictions" / "a_mask.png"), np.full((12, 16), 7, np.uint8))
    status, stderr = _run("--predictions", root / "predictions", "--labels", root / "labels", "--num-classes", 3)
    assert status == 2 and "a_mask.png: values [7] are outside the classes 0..2" in stderr
    cv2.imwrite(str(root / "predictions" / "a_mask.png"), np.zeros((10, 16), np.uint8))
    status, stderr = _run("--predictions", root / "predictions", "--labels", root / "labels", "--num-classes", 3)
    assert status == 2 and "a_mask.png is 16x10 but its label" in stderr
