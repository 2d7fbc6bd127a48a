"""Every detection config instantiates and runs a fast_dev_run on tiny data; the task's behaviour."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from tests.tools.loader import load_tool

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs" / "detection").glob("*.yaml"))
train_det = load_tool("train_det")

# Single keys over the config's model_options (a whole dict would replace the config's options).
TINY_MODEL = {"min_size": 64, "max_size": 64, "anchor_sizes": [8, 16, 32, 64, 128], "box_batch_size_per_image": 32}
TINY_MODEL_ARGS = [f"--model.model_options.{key}={value}" for key, value in TINY_MODEL.items()]
# The COCO configs' R-50/R-101 at full width cost 15-20 s each on 2 cores: a ResNet-18 with narrow heads runs the
# same config (as the segmentation and classification config tests do); the full size runs in the slow set.
SMALL_MODEL = {"backbone": "resnet18", "fpn_channels": 32, "box_head_dim": 64}
CONFIG_SIZES = [pytest.param(config, "small", id=f"{config.stem}-small") for config in CONFIGS] + [
    pytest.param(config, "full", id=f"{config.stem}-full", marks=pytest.mark.slow)
    for config in CONFIGS
    if "shapes" not in config.name  # small already
]


def _data_overrides(config: Path, data) -> list[str]:
    if "shapes" in config.name:
        return [
            f"--data.root={data.root}",
            "--data.num_train=2",
            "--data.num_val=3",
            "--data.image_size=64",
            "--data.seed=0",
        ]
    return [
        f"--data.train_images={data.train_images}",
        f"--data.train_annotations={data.train_annotations}",
        f"--data.val_images={data.val_images}",
        f"--data.val_annotations={data.val_annotations}",
        "--data.train_sizes=[64]",
        "--data.max_size=64",
    ]


@pytest.mark.parametrize(("config", "size"), CONFIG_SIZES)
def test_config_fast_dev_run(config, size, shapes, tmp_path):
    tiny_model = {**TINY_MODEL, **(SMALL_MODEL if size == "small" else {})}
    args = [
        "fit",
        f"--config={config}",
        *_data_overrides(config, shapes),
        "--data.batch_size=2",
        "--data.num_workers=0",
        "--model.backbone_weights=null",  # no downloads in tests
        *(f"--model.model_options.{key}={value}" for key, value in tiny_model.items()),
        "--trainer.fast_dev_run=1",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.strategy=auto",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    cli = train_det.main(args)
    assert cli.model.model is not None
    # the config's model options reach the model, with only the overridden keys changed
    options = yaml.safe_load(config.read_text())["model"]["model_options"]
    assert cli.model.hparams.model_options == {**options, **tiny_model}
    model = cli.model.model
    assert model.transform.min_size == (64,) and model.transform.max_size == 64
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 32
    frozen_norms = [m for m in model.backbone.modules() if type(m).__name__ == "FrozenBatchNorm2d"]
    assert bool(frozen_norms) == (options["norm"] == "frozen_bn")
    if "fpn_channels" in {**options, **tiny_model} and "_fpn" in config.stem:
        assert model.backbone.out_channels == {**options, **tiny_model}["fpn_channels"]
    if "rpn_post_nms_top_n_test" in options:
        assert model.rpn._post_nms_top_n["testing"] == options["rpn_post_nms_top_n_test"]
    assert cli.model.hparams.num_classes == 4  # 3 shape categories + background, from the annotation file
    assert cli.model.hparams.label_to_category_id == {1: 1, 2: 3, 3: 7}
    logged = cli.trainer.callback_metrics
    assert "val_bbox_AP" in logged and "train_loss" in logged
    if "mask" in config.stem:
        assert "val_segm_AP" in logged


def test_validate_and_predict_from_checkpoint(shapes, tmp_path):
    common = [
        "--config",
        str(ROOT / "configs/detection/faster_rcnn_r18_fpn_shapes.yaml"),
        *_data_overrides(ROOT / "configs/detection/faster_rcnn_r18_fpn_shapes.yaml", shapes),
        "--data.batch_size=2",
        "--data.num_workers=0",
        *TINY_MODEL_ARGS,
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
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
    assert task.hparams.class_names[1:] == ["circle", "square", "triangle"]

    infer_det = load_tool("infer_det")

    out = tmp_path / "pictures"
    assert infer_det.main([str(ckpt), str(shapes.val_images), "--output", str(out)]) == 0
    assert len(list(out.glob("*.jpg"))) == 3 and (out / "results.json").is_file()
    assert infer_det.main([str(ckpt), str(tmp_path / "nope"), "--output", str(out)]) == 2


def test_non_finite_loss_stops_with_the_terms(monkeypatch):
    from backbones.training import check_finite_losses

    losses = {"loss_classifier": torch.tensor(0.5), "loss_box_reg": torch.tensor(float("nan"))}
    with pytest.raises(FloatingPointError, match=r"step 7.*loss_box_reg=nan"):
        check_finite_losses(losses, 7)


def test_evaluator_is_built_once_and_scores_only_the_images_seen(shapes, tmp_path, monkeypatch):
    import lightning as L

    import detection.evaluation
    from detection.data import ShapesDataModule
    from detection.task import DetectionTask

    reads = []  # ground-truth files read (evaluate_results passes the loaded COCO object on, which reads nothing)
    load_ground_truth = detection.evaluation.load_ground_truth

    def counting(annotations, *args, **kwargs):
        if isinstance(annotations, (str, Path)):
            reads.append(annotations)
        return load_ground_truth(annotations, *args, **kwargs)

    monkeypatch.setattr(detection.evaluation, "load_ground_truth", counting)
    data = ShapesDataModule(root=str(shapes.root), num_train=2, num_val=3, image_size=64, seed=0, batch_size=2,
                            num_workers=0, val_batch_size=1)  # fmt: skip
    task = DetectionTask(model="faster_rcnn_r18_fpn", model_options={**TINY_MODEL, "norm": "bn"}, warmup=0)
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, limit_train_batches=1, limit_val_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0)  # fmt: skip
    with pytest.warns(UserWarning, match="scoring 2 of the 3 ground-truth images"):  # limit_val_batches=2
        trainer.fit(task, datamodule=data)
    assert len(reads) == 1  # two validations, one evaluator: the ground truth was read once
    assert "val_bbox_AP" in trainer.callback_metrics
