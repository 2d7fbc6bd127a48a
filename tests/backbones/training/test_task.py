"""The task and data-module skeleton: every schedule in every task, the class check, the CLI's traps."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

import detection.models
import segmentation.models
from backbones.classification import ClassificationTask, ImageFolderDataModule, generate_shapes_classification
from backbones.training import TrainingTask, check_num_classes
from backbones.weights import count_classes, weights_from_checkpoint
from backbones.weights_table import CLASS_LAYERS as CLASSIFIER_LAYERS
from backbones.weights_table import IMAGENET_MEAN, WEIGHTS, WeightsSpec
from detection.data import ShapesDataModule
from detection.task import DetectionTask
from detection.weights_table import DETECTION_WEIGHTS
from segmentation.task import SegmentationTask
from segmentation.weights_table import SEGMENTATION_WEIGHTS
from tests.tools.loader import load_tool

TINY_DETECTOR = {"min_size": 64, "max_size": 64, "fpn_channels": 32, "box_head_dim": 64, "norm": "bn"}
TINY_SEGMENTER = {"norm": "gn", "atrous_rates": [1, 2, 3], "aspp_channels": 16, "decoder_channels": 16}
TASKS = {
    "detection": lambda **kw: DetectionTask(model="faster_rcnn_r18_fpn", model_options=TINY_DETECTOR, **kw),
    "segmentation": lambda **kw: SegmentationTask(model="deeplabv3plus_r18", model_options=TINY_SEGMENTER, **kw),
    "classification": lambda **kw: ClassificationTask(model="resnet18", **kw),
}
CLASS_LAYERS = {"detection": detection.models.CLASS_LAYERS, "segmentation": segmentation.models.CLASS_LAYERS,
                "classification": CLASSIFIER_LAYERS}  # fmt: skip
ROOT = Path(__file__).resolve().parents[3]
BATCHES_PER_EPOCH, EPOCHS = 10, 10
TOTAL = BATCHES_PER_EPOCH * EPOCHS


def _learning_rates(task: TrainingTask) -> list[float]:
    """The learning rate of each of the TOTAL steps, from the task's own configure_optimizers."""
    task._trainer = SimpleNamespace(  # what configure_optimizers reads of a trainer fitting 10 epochs of 10 batches
        estimated_stepping_batches=TOTAL, num_training_batches=BATCHES_PER_EPOCH, accumulate_grad_batches=1,
        train_dataloader=object(), datamodule=SimpleNamespace(batch_size=4), world_size=1, num_devices=1, num_nodes=1,
    )  # fmt: skip
    config = task.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(TOTAL):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("task_name", list(TASKS))
@pytest.mark.parametrize("schedule", ["step", "cosine", "poly", "constant"])
def test_every_schedule_changes_the_lr_as_specified_in_every_task(task_name, schedule):
    options = dict(num_classes=4, lr=0.1, lr_reference_batch_size=None, schedule=schedule, warmup=1)
    options.update(warmup_unit="epoch", warmup_factor=0.5, milestones=[3, 7], milestones_unit="epoch", power=2.0)
    rates = _learning_rates(TASKS[task_name](**options))
    assert rates[0] == pytest.approx(0.1 * 0.5)  # warmup over the first epoch (10 steps) from half the rate
    assert rates[5] == pytest.approx(0.1 * _decay(schedule, 5) * 0.75)
    for step in (10, 29, 30, 50, 69, 70, 99):
        assert rates[step] == pytest.approx(0.1 * _decay(schedule, step)), step


def _decay(schedule: str, step: int) -> float:
    if schedule == "step":
        return 0.1 ** ((step >= 30) + (step >= 70))
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * step / TOTAL))
    if schedule == "poly":
        return (1 - step / TOTAL) ** 2.0
    return 1.0


def test_segmentation_step_schedule_decays():
    # It used to accept schedule="step" with no milestones to give, and kept the rate constant.
    task = SegmentationTask(model="deeplabv3plus_r18", num_classes=3, model_options=TINY_SEGMENTER, lr=0.01,
                            schedule="step", milestones=[40], milestones_unit="step", gamma=0.5)  # fmt: skip
    rates = _learning_rates(task)
    assert rates[39] == pytest.approx(0.01) and rates[40] == pytest.approx(0.005)
    with pytest.raises(ValueError, match="schedule='step' needs milestones"):
        SegmentationTask(num_classes=3, schedule="step")


@pytest.mark.parametrize(("option", "value"), [("warmup_unit", "epochs"), ("milestones_unit", "iter"), ("warmup", -1)])
def test_bad_schedule_units_are_errors(option, value):
    with pytest.raises(ValueError, match=option):
        DetectionTask(**{option: value})


def test_num_classes_rule():
    check_num_classes(5, 4)  # a model may have spare outputs
    check_num_classes(4, 4, exact=True)
    with pytest.raises(ValueError, match=r"model.num_classes=3, but the data module has 4 classes; .* at least 4"):
        check_num_classes(3, 4)
    with pytest.raises(ValueError, match=r"model.num_classes=5, but the data module has 4 classes; .* exactly 4"):
        check_num_classes(5, 4, exact=True)


def test_epoch_units_follow_the_loaded_training_data(tmp_path):
    # max_steps without max_epochs: Lightning has not loaded the training data when the optimizer is made;
    # the epoch-based warmup must still be counted in this loader's batches (18 images / 4 = 4 full batches).
    root = generate_shapes_classification(tmp_path / "cls", train_per_class=3, val_per_class=1, image_size=32, seed=1)
    data = ImageFolderDataModule(root=str(root), batch_size=4, num_workers=0, crop_size=32, resize_size=32)
    task = ClassificationTask(model="resnet18", schedule="constant", warmup=1.5, warmup_unit="epoch")
    trainer = L.Trainer(accelerator="cpu", max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(task, datamodule=data)
    assert trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0].warmup_steps == 6  # 1.5 epochs of 4 steps


def test_one_normalization_setting_in_every_task():
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.1)
    images = torch.rand(2, 3, 8, 8)
    expected = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    tasks = {name: make(num_classes=4, mean=mean, std=std) for name, make in TASKS.items()}
    for task in tasks.values():
        assert torch.equal(task.normalize(images), expected)
    detector = tasks["detection"].model  # torchvision's transform normalizes inside the detector, with these
    assert detector.transform.image_mean == list(mean) and detector.transform.image_std == list(std)
    with pytest.raises(ValueError, match="set the task's mean and std"):
        DetectionTask(num_classes=4, model_options={"image_mean": [0.5, 0.5, 0.5]})


# ---------------------------------------------------------------- a weights tag is data the task reads

WEIGHTS_TABLES = {"detection": DETECTION_WEIGHTS, "segmentation": SEGMENTATION_WEIGHTS, "classification": WEIGHTS}
FAKE_SPEC = WeightsSpec("file:///nowhere/tiny-00000000.pth", "a test's", num_classes=7, mean=(0.5, 0.4, 0.3),
                        std=(0.25, 0.2, 0.1))  # fmt: skip


@pytest.fixture
def fake_tags(monkeypatch):
    """A tag `tiny.test` in every task's table (and the backbone table) with 7 classes and its own mean/std."""
    for table in (*WEIGHTS_TABLES.values(), WEIGHTS):
        monkeypatch.setitem(table, "tiny.test", FAKE_SPEC)
    return "tiny.test"


@pytest.mark.parametrize("task_name", list(TASKS))
def test_weights_tag_fills_num_classes_mean_and_std(task_name, fake_tags):
    with weights_from_checkpoint():  # builds the model, fetches nothing
        task = TASKS[task_name](weights=fake_tags)
    assert task.hparams.num_classes == 7 and task.model is not None
    assert count_classes(task.model.state_dict(), CLASS_LAYERS[task_name]) == 7
    assert task.hparams.mean == FAKE_SPEC.mean and task.hparams.std == FAKE_SPEC.std
    assert torch.equal(task.mean.flatten(), torch.tensor(FAKE_SPEC.mean))
    fresh = TASKS[task_name](weights=fake_tags, fresh_heads=True)  # classes from the data; the inputs still theirs
    assert fresh.hparams.num_classes is None and fresh.model is None and fresh.hparams.mean == FAKE_SPEC.mean


@pytest.mark.parametrize("task_name", list(TASKS))
def test_conflicting_num_classes_mean_or_std_name_both_values_and_the_tag(task_name, fake_tags):
    with pytest.raises(ValueError, match=r"num_classes=4, but the weights 'tiny.test' \(a test's\) have num_classes=7"):
        TASKS[task_name](weights=fake_tags, num_classes=4)
    with pytest.raises(
        ValueError, match=r"mean=\[0.485, 0.456, 0.406\], but the weights 'tiny.test' .*mean=\[0.5, 0.4"
    ):
        TASKS[task_name](weights=fake_tags, num_classes=7, mean=[0.485, 0.456, 0.406])
    with pytest.raises(ValueError, match=r"std=\[1, 1, 1\], but the weights 'tiny.test' .*std=\[0.25, 0.2, 0.1\]"):
        TASKS[task_name](weights=fake_tags, num_classes=7, fresh_heads=True, std=[1, 1, 1])
    with weights_from_checkpoint():
        assert TASKS[task_name](weights=fake_tags, num_classes=7, mean=[0.5, 0.4, 0.3]).hparams.num_classes == 7


def test_backbone_weights_tag_gives_the_default_normalization_not_the_classes(fake_tags):
    with weights_from_checkpoint():
        task = TASKS["segmentation"](backbone_weights="resnet18.tv_in1k", num_classes=3)
    assert task.hparams.mean == IMAGENET_MEAN
    with pytest.raises(ValueError, match=r"mean=\[0.5, 0.5, 0.5\], but the backbone_weights 'resnet18.tv_in1k'"):
        TASKS["detection"](backbone_weights="resnet18.tv_in1k", num_classes=3, mean=[0.5, 0.5, 0.5])


def test_classes_of_a_tag_that_the_data_does_not_have_suggest_fresh_heads(fake_tags, tmp_path):
    root = generate_shapes_classification(tmp_path / "cls", train_per_class=1, val_per_class=1, image_size=32, seed=1)
    data = ImageFolderDataModule(root=str(root), batch_size=2, num_workers=0, crop_size=32, resize_size=32)
    with weights_from_checkpoint():
        task = ClassificationTask(model="resnet18", weights=fake_tags)
    with pytest.raises(
        ValueError, match=r"model.num_classes=7, but the data module has 6 .*'tiny.test': set fresh_heads"
    ):
        _setup_with(task, data)


def test_a_checkpoint_keeps_its_own_classes_whatever_the_tag(fake_tags):
    # Inside weights_from_checkpoint (the tools' loading) the checkpoint's hyper-parameters are the truth.
    with weights_from_checkpoint():
        assert ClassificationTask(model="resnet18", weights=fake_tags, num_classes=6).model.fc.out_features == 6


# ---------------------------------------------------------------- the detection data must fit the model


def _setup_with(task: TrainingTask, datamodule: L.LightningDataModule) -> None:
    task._trainer = SimpleNamespace(datamodule=datamodule)
    task.setup("fit")


def test_detection_training_scale_that_misses_the_evaluation_scale_warns(tmp_path):
    data = ShapesDataModule(root=str(tmp_path / "shapes"), image_size=64, with_masks=False)  # trains at 64
    task = DetectionTask(model="faster_rcnn_r18_fpn", model_options={**TINY_DETECTOR, "min_size": 128, "max_size": 128})
    with pytest.warns(UserWarning, match=r"train_sizes=\[64\], data.max_size=64.*min_size=128.*max_size=128"):
        _setup_with(task, data)
    assert task.hparams.num_classes == 4 and task.hparams.class_names[0] == "__background__"


def test_detection_masks_must_match_the_model(tmp_path):
    data = ShapesDataModule(root=str(tmp_path / "shapes"), image_size=64, with_masks=False)
    task = DetectionTask(model="mask_rcnn_r18_fpn", model_options=TINY_DETECTOR)
    with pytest.raises(ValueError, match=r"'mask_rcnn_r18_fpn' needs instance masks.*with_masks=False"):
        _setup_with(task, data)


# ---------------------------------------------------------------- data module: pinned memory on CUDA only


def test_loaders_pin_memory_when_the_trainer_is_on_cuda(tmp_path):
    root = generate_shapes_classification(tmp_path / "cls", train_per_class=1, val_per_class=1, image_size=32, seed=1)
    data = ImageFolderDataModule(root=str(root), batch_size=2, num_workers=0, crop_size=32, resize_size=32)
    assert not data.val_dataloader().pin_memory  # no trainer
    data.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)))
    assert data.val_dataloader().pin_memory and data.train_dataloader().pin_memory
    data.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))
    assert not data.predict_dataloader().pin_memory


# ---------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def cls_shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli") / "shapes"
    generate_shapes_classification(root, train_per_class=2, val_per_class=1, image_size=32, seed=1)
    return root


def _cls_args(root, tmp_path) -> list[str]:
    return [
        f"--config={ROOT / 'configs/classification/resnet18_shapes.yaml'}", f"--data.root={root}",
        "--data.train_per_class=2", "--data.val_per_class=1", "--data.image_size=32", "--data.seed=1",
        "--data.num_workers=0",
        "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path}",
    ]  # fmt: skip


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_ckpt_path_last_without_a_checkpoint_is_an_error(subcommand, cls_shapes, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        load_tool("train_cls").main([subcommand, *_cls_args(cls_shapes, tmp_path), "--ckpt_path=last"])
    assert exit_.value.code == 2
    assert f"error: {subcommand} --ckpt_path last: no checkpoint found (searched " in capsys.readouterr().err


def test_lightning_optimizer_options_are_not_offered(capsys, cls_shapes, tmp_path):
    # The tasks make their own optimizer and schedule; LightningCLI's --optimizer crashed (the model is built
    # in setup, after the optimizer) or would have been silently joined by our schedule.
    train_cls = load_tool("train_cls")
    with pytest.raises(SystemExit):
        train_cls.main(["fit", "--help"])
    assert "--optimizer" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        train_cls.main(["fit", *_cls_args(cls_shapes, tmp_path), "--optimizer=AdamW"])
    assert "optimizer" in capsys.readouterr().err
