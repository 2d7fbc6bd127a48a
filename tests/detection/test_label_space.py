"""The label space is a property of the model: labels 1..K of the data's categories, or the category ids themselves
(torchvision's published COCO detectors). Validation in either space writes the right category ids."""

from __future__ import annotations

import contextlib
import io
import math

import lightning as L
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from backbones.data.shapes import generate_shapes
from detection import build_model
from detection.data import ShapesDataModule
from detection.task import DetectionTask, resolve_label_space

TINY = {"min_size": 64, "max_size": 64, "anchor_sizes": [8, 16, 32, 64, 128], "box_batch_size_per_image": 32,
        "norm": "bn", "frozen_stages": -1, "fpn_channels": 32, "box_head_dim": 64}  # fmt: skip
SHAPE_IDS = {1: 1, 2: 3, 3: 7}  # the shapes' contiguous labels -> their (non-contiguous) category ids


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("shapes") / "data", num_train=4, num_val=6, image_size=64, seed=3)


def _datamodule(shapes) -> ShapesDataModule:
    return ShapesDataModule(root=str(shapes.root), num_train=4, num_val=6, image_size=64, seed=3, num_workers=0,
                            val_batch_size=3)  # fmt: skip


def _category_id_model(contiguous: torch.nn.Module, num_outputs: int) -> torch.nn.Module:
    """The same detector with its class rows moved to the category-id rows of a wider head; the other rows
    are never predicted (a logit of -1e4 has probability 0)."""
    model = build_model("faster_rcnn_r18_fpn", num_classes=num_outputs, **TINY).eval()
    state = contiguous.state_dict()
    cls_w, cls_b = (
        state.pop("roi_heads.box_predictor.cls_score.weight"),
        state.pop("roi_heads.box_predictor.cls_score.bias"),
    )
    reg_w, reg_b = (
        state.pop("roi_heads.box_predictor.bbox_pred.weight"),
        state.pop("roi_heads.box_predictor.bbox_pred.bias"),
    )
    new_cls_w, new_cls_b = torch.zeros(num_outputs, cls_w.shape[1]), torch.full((num_outputs,), -1e4)
    new_reg_w, new_reg_b = torch.zeros(4 * num_outputs, reg_w.shape[1]), torch.zeros(4 * num_outputs)
    for label, row in {0: 0, **SHAPE_IDS}.items():
        new_cls_w[row], new_cls_b[row] = cls_w[label], cls_b[label]
        new_reg_w[4 * row : 4 * row + 4], new_reg_b[4 * row : 4 * row + 4] = (
            reg_w[4 * label : 4 * label + 4],
            reg_b[4 * label : 4 * label + 4],
        )
    state.update({
        "roi_heads.box_predictor.cls_score.weight": new_cls_w, "roi_heads.box_predictor.cls_score.bias": new_cls_b,
        "roi_heads.box_predictor.bbox_pred.weight": new_reg_w, "roi_heads.box_predictor.bbox_pred.bias": new_reg_b,
    })  # fmt: skip
    model.load_state_dict(state)
    return model


def _raw_pycocotools(model: torch.nn.Module, datamodule: ShapesDataModule, label_to_category_id: dict) -> list[float]:
    """The 12 COCOeval numbers of `model`'s val predictions, written and scored by hand with pycocotools."""
    datamodule.setup("validate")
    results = []
    with torch.no_grad():
        for images, targets in datamodule.val_dataloader():
            for prediction, target in zip(model(images), targets, strict=True):
                for box, score, label in zip(prediction["boxes"].tolist(), prediction["scores"].tolist(),
                                             prediction["labels"].tolist(), strict=True):  # fmt: skip
                    if label in label_to_category_id:
                        x0, y0, x1, y1 = box
                        results.append({"image_id": int(target["image_id"]), "category_id": label_to_category_id[label],
                                        "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score})  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(datamodule.val_annotations))
        evaluation = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluation.evaluate(), evaluation.accumulate(), evaluation.summarize()
    return [float(v) for v in evaluation.stats]


STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def test_category_id_model_validates_to_raw_pycocotools(shapes, tmp_path):
    torch.manual_seed(0)
    contiguous = build_model("faster_rcnn_r18_fpn", num_classes=4, **TINY).eval()
    wide = _category_id_model(contiguous, num_outputs=8)  # ids 1, 3, 7 need labels up to 7
    raw = _raw_pycocotools(wide, _datamodule(shapes), {c: c for c in SHAPE_IDS.values()})
    assert raw == _raw_pycocotools(contiguous, _datamodule(shapes), SHAPE_IDS)  # the same detector
    assert max(raw[6:9]) > 0  # it finds something, so a wrong category id would change the numbers

    task = DetectionTask(model="faster_rcnn_r18_fpn", num_classes=8, label_space="category_id",
                         model_options=TINY, eval_backend="pycocotools", schedule="constant")  # fmt: skip
    task.model.load_state_dict(wide.state_dict())
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)  # fmt: skip
    (logged,) = trainer.validate(task, datamodule=_datamodule(shapes))
    computed = task.evaluator("val").compute()  # the evaluator's float64 numbers (-1, "no such objects", is nan)
    expected = [math.nan if value == -1 else value for value in raw]
    assert [computed[f"bbox_{name}"] for name in STAT_NAMES] == pytest.approx(expected, rel=0, abs=0, nan_ok=True)
    assert [logged[f"val_bbox_{name}"] for name in STAT_NAMES] == pytest.approx(expected, rel=1e-6, nan_ok=True)
    assert task.hparams.label_to_category_id == {c: c for c in range(1, 8)}
    assert task.hparams.class_names[:4] == ["__background__", "circle", "N/A", "square"]
    assert task.hparams.class_names[7] == "triangle"


def test_category_id_training_targets_are_category_ids(shapes, tmp_path):
    task = DetectionTask(model="faster_rcnn_r18_fpn", label_space="category_id", model_options=TINY,
                         schedule="constant")  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", logger=False, max_steps=1, limit_val_batches=0, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)  # fmt: skip
    seen = []
    original = task.to_model_labels
    task.to_model_labels = lambda targets: seen.append(original(targets)) or seen[-1]
    trainer.fit(task, datamodule=_datamodule(shapes))
    assert task.hparams.num_classes == 8  # taken from the largest category id
    labels = torch.cat([t["labels"] for t in seen[0]])
    assert set(labels.tolist()) <= {1, 3, 7} and len(labels)


def test_outputs_must_cover_the_category_ids(shapes, tmp_path):
    task = DetectionTask(model="faster_rcnn_r18_fpn", num_classes=5, label_space="category_id", model_options=TINY,
                         schedule="constant")  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"num_classes=5 .* the largest is 7 .*num_classes: 8"):
        trainer.validate(task, datamodule=_datamodule(shapes))


def test_label_space_follows_the_weights_tag():
    assert resolve_label_space(None, "mask_rcnn_r50_fpn.tv_coco", fresh_heads=False) == "category_id"
    assert resolve_label_space(None, "mask_rcnn_r50_fpn.tv_coco", fresh_heads=True) == "contiguous"
    assert resolve_label_space(None, None, fresh_heads=False) == "contiguous"
    with pytest.raises(ValueError, match="predict labels in the 'category_id' label space"):
        resolve_label_space("contiguous", "faster_rcnn_r50_fpn.tv_coco", fresh_heads=False)
    with pytest.raises(ValueError, match="label_space='ids'; choose one of 'contiguous', 'category_id'"):
        resolve_label_space("ids", None, fresh_heads=False)


def test_readme_command_for_published_weights_uses_their_label_space(tmp_path, monkeypatch):
    """The README's validate command for torchvision's COCO Mask R-CNN builds it in the category-id space, with
    the tag's 91 classes."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    from detection.weights_table import DETECTION_WEIGHTS
    from tests.tools.loader import TOOLS, load_tool

    torch.manual_seed(0)
    published = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(published.state_dict(), tmp_path / "torch" / "hub" / "checkpoints" /
               DETECTION_WEIGHTS["mask_rcnn_r50_fpn.tv_coco"].file_name)  # fmt: skip
    cli = load_tool("train_det").main([
        "--config", str(TOOLS.parent / "configs/detection/mask_rcnn_r50_fpn_1x_coco.yaml"),
        "--model.weights", "mask_rcnn_r50_fpn.tv_coco", "--model.backbone_weights", "null",
        "--trainer.accelerator", "cpu",
    ], run=False)  # fmt: skip
    assert cli.model.hparams.label_space == "category_id"
    assert cli.model.hparams.num_classes == 91  # the tag's, without --model.num_classes
    ours, theirs = cli.model.model.state_dict(), published.state_dict()
    assert set(ours) == {key for key in theirs if not key.endswith("num_batches_tracked")}  # frozen BN keeps none
    assert all(torch.equal(value, theirs[key]) for key, value in ours.items())
