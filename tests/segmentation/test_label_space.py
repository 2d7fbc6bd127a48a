"""torchvision's COCO-trained DeepLabV3 weights predict the 20 VOC classes in VOC order: with
`category_ids=VOC_CATEGORY_IDS` they validate and predict through the tools in that label space."""

from __future__ import annotations

import json

import cv2
import pytest
import torch
from torchvision.models.segmentation import deeplabv3_resnet50

from backbones.weights_table import IMAGENET_MEAN, IMAGENET_STD
from segmentation.weights_table import SEGMENTATION_WEIGHTS, VOC_CATEGORY_IDS
from tests.segmentation import test_task
from tests.segmentation.test_task import ROOT, data_overrides
from tests.tools.loader import load_tool

CONFIG = ROOT / "configs/segmentation/deeplabv3_r50_os8_coco.yaml"
TAG = "deeplabv3_r50.tv_coco_voc"
tiny_data = test_task.tiny_data  # the module-scoped fixture, shared with test_task


@pytest.fixture
def torchvision_deeplab(tmp_path, monkeypatch):
    """torchvision's deeplabv3_resnet50 with seeded random weights, in the hub cache as the tag's file."""
    torch.manual_seed(0)
    model = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=21, aux_loss=True).eval()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(model.state_dict(), checkpoints / SEGMENTATION_WEIGHTS[TAG].file_name)
    return model


def _args(command: str, tiny_data, tmp_path, *extra: str) -> list[str]:
    return [command, "--config", str(CONFIG), *data_overrides(CONFIG, tiny_data), "--model.weights", TAG,
            "--model.backbone_weights", "null", "--model.aux_loss", "true", "--trainer.accelerator", "cpu",
            "--trainer.devices", "1", "--trainer.strategy", "auto", "--trainer.sync_batchnorm", "false",
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(tmp_path), *extra]  # fmt: skip


def test_weights_table_records_the_voc_label_space():
    for tag in ("deeplabv3_r50.tv_coco_voc", "deeplabv3_r101.tv_coco_voc"):
        assert SEGMENTATION_WEIGHTS[tag].category_ids == VOC_CATEGORY_IDS
        assert SEGMENTATION_WEIGHTS[tag].num_classes == len(VOC_CATEGORY_IDS) + 1


def test_torchvision_weights_validate_and_predict_in_voc_order(torchvision_deeplab, tiny_data, tmp_path):
    cli = load_tool("train_seg").main(_args("validate", tiny_data, tmp_path))
    task = cli.model
    names = {c["id"]: c["name"] for c in json.loads(tiny_data["coco_json"].read_text())["categories"]}
    assert task.hparams.class_names == ["__background__", *(names[i] for i in VOC_CATEGORY_IDS)]
    assert "val_mIoU" in cli.trainer.callback_metrics

    images, _ = next(iter(cli.datamodule.val_dataloader()))
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ours, theirs = task.eval()(images)["out"], torchvision_deeplab((images - mean) / std)["out"]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)  # label i is VOC class i, as torchvision's

    checkpoint = tmp_path / "voc.ckpt"
    cli.trainer.save_checkpoint(checkpoint)
    image_path = sorted(tiny_data["coco_images"].glob("*.jpg"))[0]
    load_tool("infer_seg").main([str(checkpoint), str(image_path), "--output", str(tmp_path / "out"),
                                 "--save-masks", "--no-fuse"])  # fmt: skip
    predicted = cv2.imread(str(tmp_path / "out" / f"{image_path.stem}_mask.png"), cv2.IMREAD_UNCHANGED)
    image = torch.from_numpy(cv2.imread(str(image_path))[..., ::-1].copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        expected = torchvision_deeplab((image - mean) / std)["out"].argmax(1)[0].numpy()
    assert (predicted == expected).mean() > 0.99


def test_voc_weights_on_other_categories_are_an_error(torchvision_deeplab, tiny_data, tmp_path):
    with pytest.raises(ValueError, match=r"predict the categories \[5, 2, 16.*category_ids are all of the annotation"):
        load_tool("train_seg").main(_args("validate", tiny_data, tmp_path, "--data.init_args.category_ids", "null"))
