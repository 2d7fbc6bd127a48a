"""DetectionTask(report_dir=...): the report of a COCO evaluation, written by process 0."""

import json
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from detection.evaluation import COCOEvaluator
from detection.task import DetectionTask
from tests.detection import planted


def _predictions() -> tuple[list[dict], list[int]]:
    """The planted detections as torchvision outputs (labels are the category ids), one dict per image."""
    predictions, image_ids = [], sorted(planted.OBJECTS)
    for image_id in image_ids:
        rows = [d for d in planted.DETECTIONS if d[0] == image_id]
        boxes = [[x, y, x + w, y + h] for _, _, (x, y, w, h), _, _ in rows]
        predictions.append({
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor([d[3] for d in rows]),
            "labels": torch.tensor([d[1] for d in rows], dtype=torch.int64),
        })  # fmt: skip
    return predictions, image_ids


def _task_after_evaluation(tmp_path, report_dir, *, rank=0, sanity=False, predictions=None, loggers=()):
    gt_path, _ = planted.write(tmp_path)
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    for image_id in planted.OBJECTS:
        cv2.imwrite(str(images / f"{image_id}.png"), np.zeros((planted.SIZE, planted.SIZE, 3), np.uint8))
    task = DetectionTask(model="faster_rcnn_r18_fpn", report_dir=report_dir and str(report_dir))
    evaluator = COCOEvaluator(annotations=gt_path, label_to_category_id={c: c for c in (1, 2, 3)})
    task.evaluator = lambda stage: evaluator  # the evaluator the task would have built for this split
    task.evaluator_key = lambda stage: gt_path
    datamodule = SimpleNamespace(split_paths={"val": (str(images), gt_path)})
    task._trainer = SimpleNamespace(global_rank=rank, sanity_checking=sanity, datamodule=datamodule, current_epoch=3,
                                    global_step=7, loggers=list(loggers))  # fmt: skip
    task.logged = {}
    task.log_dict = lambda values, **kwargs: task.logged.update(values)
    outputs, image_ids = predictions or _predictions()
    evaluator.update(outputs, image_ids)
    return task, evaluator.compute()


def test_report_dir_passes_the_evaluation_to_the_report(tmp_path, monkeypatch):
    import detection.report

    calls = []
    monkeypatch.setattr(detection.report, "write_detection_report", lambda *a, **k: calls.append((a, k)))
    task, metrics = _task_after_evaluation(tmp_path, tmp_path / "report")
    task.report_evaluation("val", metrics)
    ((coco_gt, results, folder), options) = calls[0]
    assert folder == str(tmp_path / "report") and coco_gt is task.evaluator("val").coco_gt
    assert len(results) == len(planted.DETECTIONS) and options["images_dir"] == str(tmp_path / "images")
    assert options["iou_types"] == ("bbox",) and options["image_ids"] is None  # every image was scored


@pytest.mark.slow  # draws the figures (several seconds)
def test_report_dir_writes_the_report_of_the_evaluation(tmp_path):
    folder = tmp_path / "report"
    task, metrics = _task_after_evaluation(tmp_path, folder)
    task.report_evaluation("val", metrics)
    report = json.loads((folder / "metrics.json").read_text())
    assert report["sources"]["stage"] == "val" and report["sources"]["epoch"] == 3
    assert report["bbox"]["summary"]["AP"] == pytest.approx(metrics["bbox_AP"])
    assert report["bbox"]["summary"]["AP50"] == pytest.approx(metrics["bbox_AP50"])
    assert (folder / "report.html").is_file() and (folder / "bbox_worst_1.png").is_file()  # the val images drawn


@pytest.mark.parametrize(("report_dir", "rank", "sanity"), [(None, 0, False), ("r", 1, False), ("r", 0, True)])
def test_no_report_without_report_dir_off_rank_0_or_in_the_sanity_check(tmp_path, report_dir, rank, sanity):
    folder = tmp_path / "r" if report_dir else None
    task, metrics = _task_after_evaluation(tmp_path, folder, rank=rank, sanity=sanity)
    task.report_evaluation("val", metrics)
    assert not (tmp_path / "r").exists()


def test_no_detections_warns_instead_of_failing(tmp_path):
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    with pytest.warns(UserWarning, match="no detections to evaluate"):
        task, metrics = _task_after_evaluation(tmp_path, tmp_path / "r", predictions=([empty] * 3, [1, 2, 3]))
    with pytest.warns(UserWarning, match="no detections in the val evaluation: no report written"):
        task.report_evaluation("val", metrics)
    assert not (tmp_path / "r").exists()


def test_per_category_ap_is_logged_and_figures_go_to_loggers_that_take_them(tmp_path):
    figures = []
    takes_figures = SimpleNamespace(experiment=SimpleNamespace(add_figure=lambda *a, **k: figures.append((a, k))))
    csv_like = SimpleNamespace(experiment=SimpleNamespace())  # no add_figure: nothing drawn for it
    task, metrics = _task_after_evaluation(tmp_path, None, loggers=[csv_like, takes_figures])
    task.report_evaluation("val", metrics)
    per_category = task.evaluator("val").per_category_ap("bbox")
    assert task.logged == {f"val_bbox_AP_{name}": ap for name, ap in per_category.items()}
    assert sorted(args[0] for args, _ in figures) == ["val_bbox_confusion_matrix", "val_bbox_pr_curve"]
    assert all(kwargs == {"global_step": 7} and hasattr(args[1], "savefig") for args, kwargs in figures)


def test_figures_come_from_the_report_without_evaluating_again(tmp_path, monkeypatch):
    import detection.report

    evaluations = []
    run = detection.report.run_cocoeval
    monkeypatch.setattr(detection.report, "run_cocoeval", lambda *a, **k: evaluations.append(a[2]) or run(*a, **k))
    monkeypatch.setattr(detection.report, "write_section", lambda *a, **k: None)  # the page's drawings: not here
    figures = []
    takes_figures = SimpleNamespace(experiment=SimpleNamespace(add_figure=lambda *a, **k: figures.append(a[0])))
    task, metrics = _task_after_evaluation(tmp_path, tmp_path / "report", loggers=[takes_figures])
    task.report_evaluation("val", metrics)
    assert evaluations == ["bbox"]  # one pycocotools evaluation serves the report and the logger's figures
    assert sorted(figures) == ["val_bbox_confusion_matrix", "val_bbox_pr_curve"]
    assert (tmp_path / "report" / "metrics.json").is_file()


@pytest.mark.slow  # a fresh interpreter importing torch: tens of seconds on a busy machine
def test_report_code_imports_neither_lightning_nor_pyplot():
    import subprocess
    import sys

    code = (
        "import sys, detection.report\nprint(sorted(m for m in ('lightning', 'matplotlib.pyplot') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_report_dir_is_a_run_setting_not_a_saved_hyperparameter():
    # LightningCLI puts a checkpoint's hyper-parameters over the command line's when validating --ckpt_path FILE
    task = DetectionTask(model="faster_rcnn_r18_fpn", report_dir="report")
    assert task.report_dir == "report" and "report_dir" not in task.hparams
