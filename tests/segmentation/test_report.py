"""The segmentation report: bootstrap intervals from per-image statistics, and SegmentationTask(report_dir=...)."""

import csv
import json
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.logger import Logger

from backbones.report import image_draws, percentile_interval
from segmentation.data import ShapesSegmentationDataModule
from segmentation.evaluation import SegmentationEvaluator, metrics_from_statistics
from segmentation.report import segmentation_metrics
from segmentation.task import SegmentationTask
from tests.tools.test_eval_det import _check_page

NUM_CLASSES = 4


def _evaluated(num_images=7, seed=0):
    """An evaluator that kept the per-image statistics of random images, and the images."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (num_images, 6, 5), generator=generator)
    labels[0, :2] = 255
    labels[1] = torch.where(labels[1] == 3, 2, labels[1])  # class 3 absent from one image's ground truth
    noise = torch.randint(0, NUM_CLASSES, labels.shape, generator=generator)
    predictions = torch.where(torch.rand(labels.shape, generator=generator) < 0.6, labels.clamp(max=3), noise)
    evaluator = SegmentationEvaluator(NUM_CLASSES, per_image=True)
    for start in range(0, num_images, 3):  # batches of 3, 3 and 1
        evaluator.update(predictions[start : start + 3], labels[start : start + 3])
    evaluator.compute()
    return evaluator, predictions, labels


def test_point_estimate_is_the_evaluators_exactly():
    evaluator, _, _ = _evaluated()
    statistics = evaluator.per_image_statistics
    assert statistics.shape == (7, 3, NUM_CLASSES) and evaluator.image_indices.tolist() == list(range(7))
    metrics = segmentation_metrics(evaluator.total_confusion, statistics, list("abcd"), num_bootstrap=10)
    computed = evaluator.compute()
    assert metrics["summary"] == computed  # the same floats, not approximately
    unit_draw = metrics_from_statistics(torch.from_numpy(np.ones(7) @ statistics.reshape(7, -1)).reshape(3, -1))
    assert float(unit_draw["mIoU"]) == computed["mIoU"] and float(unit_draw["pixel_acc"]) == computed["pixel_acc"]


def test_draws_equal_evaluations_of_the_resampled_images():
    evaluator, predictions, labels = _evaluated()
    metrics = segmentation_metrics(evaluator.total_confusion, evaluator.per_image_statistics, list("abcd"),
                                   num_bootstrap=30, seed=5)  # fmt: skip
    direct = []
    for draw in image_draws(7, 30, seed=5):  # the report's draws: the same seed gives the same images
        chosen = np.repeat(np.arange(7), draw)
        resampled = SegmentationEvaluator(NUM_CLASSES)
        resampled.update(predictions[chosen], labels[chosen])
        direct.append([resampled.compute()[key] for key in ("mIoU", "pixel_acc", "mean_acc")])
    expected = percentile_interval(np.array(direct))
    intervals = metrics["bootstrap"]["summary"]
    actual = np.array([intervals[key] for key in ("mIoU", "pixel_acc", "mean_acc")]).T
    np.testing.assert_allclose(actual, expected, rtol=1e-12)
    again = segmentation_metrics(evaluator.total_confusion, evaluator.per_image_statistics, list("abcd"),
                                 num_bootstrap=30, seed=5)  # fmt: skip
    assert again["bootstrap"] == metrics["bootstrap"]  # seeded: reproducible


def test_gathered_statistics_follow_the_eval_sampler_order(monkeypatch):
    """Rank r of W evaluates images r, r + W, ...: the gathered rows are put back in dataset order."""
    import segmentation.evaluation as evaluation

    evaluator = SegmentationEvaluator(2, per_image=True)
    mine = torch.tensor([[[0, 0], [1, 0], [0, 0]], [[0, 0], [3, 0], [0, 0]], [[0, 0], [5, 0], [0, 0]]])
    evaluator._image_statistics = [mine]  # rank 0's images 0, 2, 4 (one ground-truth pixel count each)
    other = np.array([[[0, 0], [2, 0], [0, 0]], [[0, 0], [4, 0], [0, 0]]])  # rank 1's images 1, 3

    def all_gather_object(gathered, local):
        gathered[:] = [local, other]

    fake = SimpleNamespace(is_available=lambda: True, is_initialized=lambda: True, get_world_size=lambda: 2,
                           all_gather_object=all_gather_object)  # fmt: skip
    monkeypatch.setattr(evaluation, "dist", fake)
    evaluator._gather_per_image()
    assert evaluator.image_indices.tolist() == [0, 1, 2, 3, 4]
    assert evaluator.per_image_statistics[:, 1, 0].tolist() == [1, 2, 3, 4, 5]


class FigureLogger(Logger):
    """A logger that takes figures, as TensorBoard's (not installed here): it records ``add_figure`` calls."""

    def __init__(self):
        super().__init__()
        self.figures = []

    @property
    def name(self):
        return "figures"

    @property
    def version(self):
        return 0

    @property
    def experiment(self):
        return SimpleNamespace(add_figure=lambda tag, figure, global_step: self.figures.append((tag, global_step)))

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_validation_logs_per_class_scalars_and_figures_and_writes_the_report(tmp_path):
    datamodule = ShapesSegmentationDataModule(root=str(tmp_path / "shapes"), num_train=1, num_val=3, image_size=32,
                                              batch_size=2, num_workers=0)  # fmt: skip
    folder = tmp_path / "report"
    task = SegmentationTask(model="deeplabv3plus_r18", report_dir=str(folder), report_bootstrap=20)
    figures = FigureLogger()
    trainer = L.Trainer(accelerator="cpu", logger=[CSVLogger(tmp_path / "logs"), figures], enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    (logged,) = trainer.validate(task, datamodule, verbose=False)

    assert figures.figures == [("val_confusion_matrix", 0)]
    with open(next((tmp_path / "logs").rglob("metrics.csv"))) as file:
        columns = next(csv.reader(file))
    per_class = task.evaluator("val").per_class()
    expected = {f"val_IoU_{name}" for name, row in per_class.items() if row["IoU"] >= 0}  # nan: not logged
    assert expected and expected <= set(columns) and expected <= set(logged)

    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["summary"] == task.evaluator("val").compute() and metrics["num_images"] == 3
    assert metrics["summary"]["mIoU"] == pytest.approx(logged["val_mIoU"])  # logged as float32
    assert metrics["per_image"]["names"] == ["000001.jpg", "000002.jpg", "000003.jpg"]  # the val images, in order
    assert metrics["bootstrap"]["draws"] == 20
    _, images = _check_page(folder)
    assert {"confusion_matrix.png", "per_class.png"} <= set(images) and "worst_1.png" in images
    page = (folder / "report.html").read_text()  # the overlays' colours named: VOC's map, background uncoloured
    assert 'style="background: #800000"></span>circle' in page and 'style="background: #008000"></span>square' in page
    assert 'style="background: transparent"></span>__background__' in page


def test_report_settings_stay_out_of_the_checkpoint_hyperparameters():
    """LightningCLI puts a checkpoint's hyperparameters over the command line's (`validate --ckpt_path FILE`)."""
    task = SegmentationTask(model="deeplabv3plus_r18", report_dir="report", report_bootstrap=5, report_seed=1)
    assert (task.report_dir, task.report_bootstrap, task.report_seed) == ("report", 5, 1)
    assert not {"report_dir", "report_bootstrap", "report_seed"} & set(task.hparams)
    with pytest.raises(ValueError, match="report_bootstrap=-1"):
        SegmentationTask(report_bootstrap=-1)
