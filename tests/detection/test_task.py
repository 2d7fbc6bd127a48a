"""Every detection config instantiates and runs a fast_dev_run on tiny data; the task's behaviour."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from backbones.data.shapes import generate_shapes
from tests.tools.loader import load_tool

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs" / "detection").glob("*.yaml"))
train_det = load_tool("train_det")

TINY_MODEL = '{"min_size": 64, "max_size": 64, "anchor_sizes": [8, 16, 32, 64, 128], "box_batch_size_per_image": 32}'


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("shapes") / "data", num_train=4, num_val=3, image_size=64, seed=1)


def _data_overrides(config: Path, data) -> list[str]:
    if "shapes" in config.name:
        return [f"--data.root={data.root}", "--data.num_train=4", "--data.num_val=3", "--data.image_size=64", "--data.seed=1"]
    return [
        f"--data.train_images={data.train_images}",
        f"--data.train_annotations={data.train_annotations}",
        f"--data.val_images={data.val_images}",
        f"--data.val_annotations={data.val_annotations}",
        "--data.train_sizes=[64]",
        "--data.max_size=64",
    ]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_fast_dev_run(config, tiny_shapes, tmp_path):
    args = [
        "fit",
        f"--config={config}",
        *_data_overrides(config, tiny_shapes),
        "--data.batch_size=2",
        "--data.num_workers=0",
        "--model.backbone_weights=null",  # no downloads in tests
        "--model.model_options.norm=bn",
        "--model.model_options.frozen_stages=-1",
        f"--model.model_options={TINY_MODEL}",
        "--trainer.fast_dev_run=1",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.strategy=auto",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    cli = train_det.main(args)
    assert cli.model.model is not None
    assert cli.model.hparams.num_classes == 4  # 3 shape categories + background, from the annotation file
    assert cli.model.hparams.label_to_category_id == {1: 1, 2: 3, 3: 7}
    logged = cli.trainer.callback_metrics
    assert "val_bbox_AP" in logged and "train_loss" in logged
    if "mask" in config.stem:
        assert "val_segm_AP" in logged


def test_validate_and_predict_from_checkpoint(tiny_shapes, tmp_path):
    common = [
        "--config", str(ROOT / "configs/detection/faster_rcnn_r18_fpn_shapes.yaml"),
        *_data_overrides(ROOT / "configs/detection/faster_rcnn_r18_fpn_shapes.yaml", tiny_shapes),
        "--data.batch_size=2", "--data.num_workers=0", f"--model.model_options={TINY_MODEL}",
        "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
    ]
    train_det.main(["fit", *common, "--trainer.max_steps=2", "--trainer.limit_val_batches=1"])
    ckpt = next((tmp_path / "lightning_logs").rglob("last.ckpt"))
    cli = train_det.main(["validate", *common, f"--ckpt_path={ckpt}"])
    assert {"val_bbox_AP", "val_bbox_AP50", "val_bbox_APs", "val_bbox_APl"} <= set(cli.trainer.callback_metrics)
    cli = train_det.main(["predict", *common, f"--ckpt_path={ckpt}"])  # the test split is the val split here
    predictions = [p for batch in cli.trainer.predict_loop.predictions for p in batch]
    assert sorted(p["image_id"] for p in predictions) == [1, 2, 3]  # every image once
    assert all({"boxes", "labels", "scores"} <= set(p) for p in predictions)

    from detection.task import DetectionTask

    task = DetectionTask.load_from_checkpoint(ckpt, weights_only=True)  # hparams carry num_classes and names
    assert task.hparams.num_classes == 4
    assert task.hparams.category_names[1:] == ["circle", "square", "triangle"]

    infer_det = load_tool("infer_det")

    out = tmp_path / "pictures"
    assert infer_det.main([str(ckpt), str(tiny_shapes.val_images), "--output", str(out)]) == 0
    assert len(list(out.glob("*.jpg"))) == 3 and (out / "results.json").is_file()
    assert infer_det.main([str(ckpt), str(tmp_path / "nope"), "--output", str(out)]) == 2


def test_non_finite_loss_stops_with_the_terms(monkeypatch):
    from backbones.training import check_finite_losses

    losses = {"loss_classifier": torch.tensor(0.5), "loss_box_reg": torch.tensor(float("nan"))}
    with pytest.raises(FloatingPointError, match=r"step 7.*loss_box_reg=nan"):
        check_finite_losses(losses, 7)
