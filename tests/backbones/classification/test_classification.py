"""Classification pretraining: every config runs, bad folders fail clearly, the recipe's pieces behave."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import pytest
import torch
import yaml
from torch import nn
from torch.nn import functional as F
from torchvision.transforms import v2

from backbones.classification import (
    SHAPES_CLASSIFICATION_CLASSES,
    ClassificationTask,
    ImageFileError,
    ImageFolderDataModule,
    ImageFolderError,
    ShapesClassificationDataModule,
    generate_shapes_classification,
)
from backbones.weights_table import WEIGHTS
from tests.tools.loader import load_tool

ROOT = Path(__file__).resolve().parents[3]
CONFIGS = sorted((ROOT / "configs" / "classification").glob("*.yaml"))
train_cls = load_tool("train_cls")

TINY = dict(train_per_class=3, val_per_class=2, image_size=32, seed=1)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return generate_shapes_classification(tmp_path_factory.mktemp("cls") / "shapes", **TINY)


def _tiny_data(root: Path, **kwargs) -> ImageFolderDataModule:
    options = dict(batch_size=4, num_workers=0, crop_size=32, resize_size=36)
    return ImageFolderDataModule(root=str(root), **{**options, **kwargs})


def _trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    return L.Trainer(**{**options, **kwargs})


def _copy_tree(root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(root, tmp_path / "data"))


# ---------------------------------------------------------------- every config runs


def _data_overrides(config: Path, root: Path) -> list[str]:
    if "shapes" in config.stem:
        return [f"--data.root={root}", *(f"--data.{k}={v}" for k, v in TINY.items())]
    return [
        f"--data.train_dir={root / 'train'}",
        f"--data.val_dir={root / 'val'}",
        "--data.crop_size=32",
        "--data.resize_size=36",
    ]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_fast_dev_run(config, tiny_root, tmp_path):
    args = [
        "fit",
        f"--config={config}",
        *_data_overrides(config, tiny_root),
        "--data.batch_size=4",
        "--data.num_workers=0",
        "--model.model=resnet18",  # the configs' ResNet-50s are slow to build for a smoke test
        "--model.weights=null",
        "--trainer.fast_dev_run=1",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.strategy=auto",
        "--trainer.precision=32-true",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    cli = train_cls.main(args)
    assert cli.model.hparams.num_classes == len(SHAPES_CLASSIFICATION_CLASSES)  # from the class folders
    assert cli.model.hparams.class_names == list(SHAPES_CLASSIFICATION_CLASSES)
    metrics = cli.trainer.callback_metrics
    assert {"train_loss", "val_loss", "val_top1", "val_top5"} <= set(metrics)
    assert (cli.model.ema is not None) == (cli.model.hparams.ema_decay is not None)
    # the config's recipe reaches the model, the optimizer and the schedule
    recipe = yaml.safe_load(config.read_text())["model"]
    model = cli.model.model
    assert bool(model.layer1[0].bn2.weight.abs().max() < 0.1) == recipe["zero_init_last"]  # 0 (one step moves it) or 1
    groups = cli.trainer.optimizers[0].param_groups
    assert len(groups) == (1 if recipe["norm_bias_decay"] else 2)
    assert groups[0]["initial_lr"] == pytest.approx(recipe["lr"] * 4 / recipe["lr_reference_batch_size"])
    schedule = cli.trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0]
    assert schedule.schedule == recipe["schedule"]
    batches_per_epoch = cli.trainer.num_training_batches
    assert schedule.warmup_steps == round(recipe["warmup"] * batches_per_epoch)  # warmup_unit: epoch
    if recipe["schedule"] == "step":
        assert schedule.milestones == [m * batches_per_epoch for m in recipe["milestones"]]


# ---------------------------------------------------------------- data


def test_image_folder_classes_and_shapes(tiny_root):
    data = _tiny_data(tiny_root)
    assert data.class_names == sorted(SHAPES_CLASSIFICATION_CLASSES) and data.num_classes == 6  # before setup
    data.setup("fit")
    image, label = data.dataset("train")[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 0
    images, labels = next(iter(data.val_dataloader()))
    assert images.shape == (4, 3, 32, 32) and labels.tolist() == [0, 0, 1, 1]
    assert len(data.dataset("train")) == 18 and len(data.dataset("val")) == 12


def test_the_task_normalizes_as_the_data_transforms_did(tiny_root):
    # One place for normalization in all three tasks: the data gives [0, 1], the task normalizes.
    images, _ = next(iter(_tiny_data(tiny_root).train_dataloader()))
    assert images.dtype == torch.float32 and images.min() >= 0 and images.max() <= 1
    mean, std = WEIGHTS["resnet50.tv_in1k"].mean, WEIGHTS["resnet50.tv_in1k"].std
    task = ClassificationTask(model="resnet18", num_classes=6, mean=mean, std=std)
    before = torch.stack([v2.Normalize(list(mean), list(std))(image) for image in images])  # the old transform
    assert torch.equal(task.normalize(images), before)  # bit for bit: the same inputs reach the model
    with pytest.raises(ValueError, match="give three values each"):
        ClassificationTask(model="resnet18", num_classes=6, mean=(0.5,))


def test_missing_folder_is_named(tmp_path):
    data = ImageFolderDataModule(train_dir=str(tmp_path / "nowhere"), val_dir=str(tmp_path / "val"))
    with pytest.raises(ImageFolderError, match="nowhere does not exist"):
        data.setup("fit")


def test_empty_class_folder_is_named(tiny_root, tmp_path):
    root = _copy_tree(tiny_root, tmp_path)
    (root / "train" / "zigzag").mkdir()
    with pytest.raises(ImageFolderError, match=r"class folder .*train/zigzag holds no images"):
        _tiny_data(root).setup("fit")


def test_val_class_missing_from_train_is_named(tiny_root, tmp_path):
    root = _copy_tree(tiny_root, tmp_path)
    shutil.copytree(root / "val" / "circle", root / "val" / "zebra")
    with pytest.raises(ImageFolderError, match=r"val: class folder\(s\) zebra are not among the 6 training classes"):
        _tiny_data(root).setup("validate")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_image_is_named_when_read(tiny_root, tmp_path, damage):
    root = _copy_tree(tiny_root, tmp_path)
    bad = root / "train" / "circle" / "000001.JPEG"
    data = bad.read_bytes()
    bad.write_bytes(b"not an image" if damage == "garbage" else data[: len(data) // 2])
    dataset = _tiny_data(root).dataset("train")  # the scan does not decode: the error comes at read time
    index = [path for path, _ in dataset.samples].index(str(bad))
    with pytest.raises(ImageFileError, match=rf"{bad}: (cannot be decoded|truncated JPEG)"):
        dataset[index]


def test_grey_and_png_images_become_rgb(tiny_root, tmp_path):
    root = _copy_tree(tiny_root, tmp_path)
    cv2.imwrite(str(root / "train" / "dots" / "grey.png"), np.full((20, 30), 128, np.uint8))
    dataset = _tiny_data(root).dataset("train")
    image, label = dataset[[path for path, _ in dataset.samples].index(str(root / "train" / "dots" / "grey.png"))]
    assert image.shape == (3, 32, 32) and label == 2


def test_shapes_data_module_generates_on_first_use(tmp_path):
    data = ShapesClassificationDataModule(root=str(tmp_path / "gen"), num_workers=0, batch_size=4, **TINY)
    assert data.num_classes == 6 and not (tmp_path / "gen").exists()  # known before the files exist
    data.setup("fit")
    assert (tmp_path / "gen" / "COMPLETE").is_file() and len(data.dataset("val")) == 12
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
    again = generate_shapes_classification(tmp_path / "gen", **TINY)  # reused, byte for byte the same
    assert again == tmp_path / "gen"
    with pytest.raises(ValueError, match="generated with"):
        generate_shapes_classification(tmp_path / "gen", **{**TINY, "seed": 2})


# ---------------------------------------------------------------- the task


def test_paper_schedule_and_cosine_warmup():
    paper = ClassificationTask(model="resnet18", num_classes=6).lr_schedule(total_steps=900, steps_per_epoch=10)
    assert [paper(s) for s in (0, 299, 300, 599, 600, 799)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert paper(800) == pytest.approx(0.001)
    task = ClassificationTask(model="resnet18", num_classes=6, schedule="cosine", warmup=5, warmup_factor=0.001)
    cosine = task.lr_schedule(total_steps=1200, steps_per_epoch=10)
    assert cosine(0) == pytest.approx(0.001) and cosine(50) == pytest.approx(0.5 * (1 + np.cos(np.pi * 50 / 1200)))
    assert cosine(1200) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("norm_bias_decay", [True, False])
def test_param_groups_and_lr_scaled_by_global_batch(tiny_root, tmp_path, norm_bias_decay):
    task = ClassificationTask(model="resnet18", norm_bias_decay=norm_bias_decay, zero_init_last=True)
    trainer = _trainer(tmp_path, fast_dev_run=1, accumulate_grad_batches=2)
    trainer.fit(task, datamodule=_tiny_data(tiny_root))
    groups = trainer.optimizers[0].param_groups
    assert all(g["initial_lr"] == pytest.approx(0.1 * 4 * 1 * 2 / 256) for g in groups)  # batch 4, 1 device, accum 2
    assert all(g["momentum"] == 0.9 for g in groups)
    names = {id(p): n for n, p in task.model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 1e-4
    if norm_bias_decay:
        assert len(groups) == 1 and decayed == set(names.values())
        return
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert groups[1]["weight_decay"] == 0.0 and decayed | no_decay == set(names.values())
    assert decayed == {n for n, p in task.model.named_parameters() if p.ndim > 1}  # conv and fc weights
    assert "fc.bias" in no_decay and "layer1.0.bn2.weight" in no_decay


def test_zero_init_last_reaches_the_model():
    task = ClassificationTask(model="resnet18", num_classes=6, zero_init_last=True)
    assert torch.count_nonzero(task.model.layer1[0].bn2.weight) == 0
    assert torch.count_nonzero(ClassificationTask(model="resnet18", num_classes=6).model.layer1[0].bn2.weight) > 0


def test_ema_is_updated_used_for_validation_and_checkpointed(tiny_root, tmp_path):
    data = _tiny_data(tiny_root)
    task = ClassificationTask(model="resnet18", ema_decay=0.5, lr=0.05)
    trainer = _trainer(tmp_path, max_steps=3, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(task, datamodule=data)
    model, ema = task.model.state_dict(), task.ema.module.state_dict()
    assert not all(torch.equal(model[k], ema[k]) for k in model)  # an average, not a copy
    assert all(not p.requires_grad for p in task.ema.parameters())

    before = {k: v.clone() for k, v in ema.items()}
    task.ema.update(task.model, step=10)
    key = "layer2.0.conv1.weight"
    assert torch.allclose(task.ema.module.state_dict()[key], 0.5 * before[key] + 0.5 * model[key])

    # validation goes through the EMA network
    metrics = _trainer(tmp_path).validate(task, datamodule=data, verbose=False)[0]
    task.ema.module.eval()
    with torch.no_grad():
        losses = [
            (F.cross_entropy(task.ema.module(task.normalize(x)), y, reduction="sum"), len(y))
            for x, y in data.val_dataloader()
        ]
    assert metrics["val_loss"] == pytest.approx(
        sum(loss.item() for loss, _ in losses) / sum(n for _, n in losses), rel=1e-4
    )
    assert task.eval_model is task.ema.module

    trainer.save_checkpoint(tmp_path / "ema.ckpt")
    state = torch.load(tmp_path / "ema.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(state["ema.module." + key], task.ema.module.state_dict()[key])
    restored = ClassificationTask.load_from_checkpoint(tmp_path / "ema.ckpt")
    assert torch.equal(restored.ema.module.state_dict()[key], task.ema.module.state_dict()[key])
    assert restored.hparams.class_names == list(SHAPES_CLASSIFICATION_CLASSES)


@pytest.mark.parametrize("num_classes", [3, 7])
def test_num_classes_other_than_the_data_is_an_error(tiny_root, tmp_path, num_classes):
    # The labels are the class folders, named one for one in the checkpoint: spare outputs would have no name.
    task = ClassificationTask(model="resnet18", num_classes=num_classes)
    with pytest.raises(
        ValueError, match=f"num_classes={num_classes}, but the data module has 6 classes; the model needs exactly 6"
    ):
        _trainer(tmp_path, fast_dev_run=1).fit(task, datamodule=_tiny_data(tiny_root))


def test_predict_gives_top_classes(tiny_root, tmp_path):
    task = ClassificationTask(model="resnet18", num_classes=6)
    predictions = _trainer(tmp_path).predict(task, datamodule=_tiny_data(tiny_root))
    assert predictions[0]["labels"].shape == (4, 5) and predictions[0]["scores"].shape == (4, 5)
    assert torch.all(predictions[0]["scores"][:, :-1] >= predictions[0]["scores"][:, 1:])
    assert isinstance(task.model, nn.Module)
