"""Trains and validates the three tasks on tiny data under DDP; run by tests/test_distributed.py.

    python -m tests.distributed_worker --data DIR --out DIR [--devices 2]

Lightning's DDP launcher starts the other processes by running this same command again, so every
process runs `main` and takes part in every `fit` and `validate`. Each task trains a few steps
(training batches split over the processes), saves a checkpoint and validates it; each process
writes `<task>_rank<r>.json` with the dataset indices its validation loader gave it, and rank 0
adds the validation metrics. The test validates the same checkpoints in one process and compares.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning as L
import torch

TINY_DETECTOR = dict(
    norm="bn", frozen_stages=-1, min_size=64, max_size=64, anchor_sizes=[8, 16, 32, 64, 128],
    box_batch_size_per_image=32, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50,
)  # fmt: skip
TINY_SEGMENTER = dict(norm="gn", frozen_stages=-1, atrous_rates=[1, 2, 3], aspp_channels=16, decoder_channels=16)
SHAPES = dict(num_train=4, num_val=7, image_size=64, seed=1)  # 7 validation images: odd, so DDP would pad


def detection(data: Path):
    from detection.data import ShapesDataModule
    from detection.task import DetectionTask

    datamodule = ShapesDataModule(root=str(data / "shapes"), batch_size=1, num_workers=0, **SHAPES)
    task = DetectionTask(model="faster_rcnn_r18_fpn", model_options=TINY_DETECTOR, lr=0.01, warmup=0)
    return DetectionTask, task, datamodule


def segmentation(data: Path):
    from segmentation.data import ShapesSegmentationDataModule
    from segmentation.task import SegmentationTask

    datamodule = ShapesSegmentationDataModule(root=str(data / "shapes"), batch_size=2, num_workers=0, **SHAPES)
    task = SegmentationTask(model="deeplabv3plus_r18", model_options=TINY_SEGMENTER, lr=0.01)
    return SegmentationTask, task, datamodule


def classification(data: Path):
    from backbones.classification import ClassificationTask, ImageFolderDataModule

    datamodule = ImageFolderDataModule(
        train_dir=str(data / "cls" / "train"), val_dir=str(data / "cls" / "val7"), batch_size=2, val_batch_size=1,
        num_workers=0, crop_size=32, resize_size=32,
    )  # fmt: skip
    task = ClassificationTask(
        model="resnet18", lr=0.01, model_options={"norm": "gn"}
    )  # BN stats of 3 steps: huge logits
    return ClassificationTask, task, datamodule


TASKS = {"detection": detection, "segmentation": segmentation, "classification": classification}


def trainer(root: Path, devices: int, **kwargs) -> L.Trainer:
    options = dict(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=root,
    )  # fmt: skip
    return L.Trainer(**{**options, **kwargs})


def validation_indices(trainer: L.Trainer) -> list[int]:
    loader = trainer.val_dataloaders
    return [int(i) for i in loader.sampler]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--tasks", default=",".join(TASKS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for name in args.tasks.split(","):
        L.seed_everything(0, verbose=False)
        _, task, datamodule = TASKS[name](args.data)
        fitter = trainer(args.out, args.devices, max_epochs=1, limit_val_batches=0)
        fitter.fit(task, datamodule=datamodule)
        checkpoint = args.out / f"{name}.ckpt"
        fitter.save_checkpoint(checkpoint)
        validator = trainer(args.out, args.devices)
        metrics = validator.validate(task, datamodule=datamodule, verbose=False)[0]
        record = {
            "world_size": validator.world_size,
            "train_steps": fitter.global_step,
            "indices": validation_indices(validator),
            "checkpoint": str(checkpoint),
        }
        if validator.is_global_zero:
            record["metrics"] = {key: float(value) for key, value in metrics.items()}
        (args.out / f"{name}_rank{validator.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
