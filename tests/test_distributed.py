"""Multi-process training and evaluation of the three tasks.

Two DDP processes (gloo on the CPU, launched the way `--trainer.devices 2 --trainer.strategy ddp`
launches them) train each task a few steps and validate a saved checkpoint on 7 images; one process
validating the same checkpoint must give the same metrics, every image counted once. Then: the
Trainer's `sync_batchnorm` keeps frozen norms frozen, the learning rate scales with the global batch,
channels-last reaches the convolutions, and the commands of tools/gpu_check.sh parse with the tools.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from backbones.classification import ClassificationTask, generate_shapes_classification
from backbones.data.shapes import generate_shapes
from tests import distributed_worker as worker
from tests.tools.loader import load_tool

ROOT = Path(__file__).resolve().parents[1]
VAL_IMAGES = worker.SHAPES["num_val"]
DDP_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """Shapes for detection and segmentation, image folders for classification; 7 validation images each."""
    root = tmp_path_factory.mktemp("ddp_data")
    generate_shapes(root / "shapes", **worker.SHAPES)
    folders = generate_shapes_classification(
        root / "cls_all", train_per_class=2, val_per_class=2, image_size=32, seed=1
    )
    shutil.copytree(folders / "train", root / "cls" / "train")
    for path in sorted((folders / "val").rglob("*.JPEG"))[:VAL_IMAGES]:  # 7 of the 12: not a multiple of 2
        (root / "cls" / "val7" / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, root / "cls" / "val7" / path.parent.name / path.name)
    return root


@pytest.fixture(scope="module")
def two_process_run(tiny_data, tmp_path_factory) -> Path:
    """Runs tests/distributed_worker.py on 2 processes once for the three tasks; returns its output folder."""
    out = tmp_path_factory.mktemp("ddp_out")
    command = [sys.executable, "-m", "tests.distributed_worker", "--data", str(tiny_data), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=DDP_TIMEOUT_S, check=False
    )
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return out


@pytest.mark.slow  # two DDP processes train and validate the three tasks: minutes on 2 cores
@pytest.mark.parametrize("task_name", list(worker.TASKS))
def test_two_process_validation_equals_one_process(task_name, two_process_run, tiny_data, tmp_path):
    ranks = [json.loads((two_process_run / f"{task_name}_rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["train_steps"] >= 1  # it trained under DDP before validating
    # every validation image on exactly one rank: 4 + 3, no padding copy
    assert sorted(ranks[0]["indices"] + ranks[1]["indices"]) == list(range(VAL_IMAGES))
    assert len(ranks[0]["indices"]) == 4 and len(ranks[1]["indices"]) == 3

    task_class, _, datamodule = worker.TASKS[task_name](tiny_data)
    task = task_class.load_from_checkpoint(ranks[0]["checkpoint"], map_location="cpu", weights_only=True)
    one_process = worker.trainer(tmp_path, devices=1).validate(task, datamodule=datamodule, verbose=False)[0]
    two_processes = ranks[0]["metrics"]
    assert set(one_process) == set(two_processes)
    for key, value in one_process.items():
        assert float(value) == pytest.approx(two_processes[key], rel=1e-6, abs=1e-9, nan_ok=True), key


# ---------------------------------------------------------------- SyncBatchNorm through the Trainer


def test_trainer_sync_batchnorm_converts_only_trainable_norms():
    # DDP refuses SyncBatchNorm on CPU modules, so this stops where Lightning would wrap the model:
    # the plugin our configure_model installs converts it; tools/gpu_check.sh trains through it on a GPU.
    trainer = L.Trainer(accelerator="cpu", devices=2, num_nodes=2, strategy="ddp", sync_batchnorm=True, logger=False)
    task = ClassificationTask(model="resnet18", num_classes=6, model_options={"frozen_stages": 1})
    task.trainer = trainer
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # trainable norms on 4 processes: nothing to warn about
        task.configure_model()
    task = trainer.strategy._layer_sync.apply(task)  # what DDPStrategy.setup does next
    model = task.model
    assert type(model.layer1[0].bn1) is nn.BatchNorm2d and type(model.layer2[0].bn1) is nn.SyncBatchNorm
    frozen, trainable = model.layer1[0].bn1.running_mean.clone(), model.layer2[0].bn1.running_mean.clone()
    task.train()
    with torch.no_grad():
        model(torch.rand(2, 3, 32, 32))  # no process group: SyncBatchNorm computes like BatchNorm2d
    assert torch.equal(model.layer1[0].bn1.running_mean, frozen)  # frozen statistics stay
    assert not torch.equal(model.layer2[0].bn1.running_mean, trainable)

    task = trainer.strategy._layer_sync.revert(task).train()  # DDPStrategy.teardown
    assert not task.model.layer1[0].bn1.training and task.model.layer2[0].bn1.training


# ---------------------------------------------------------------- learning rate scaling and channels-last


def _fit_setup(name: str, tiny_data: Path):
    task_class, task, datamodule = worker.TASKS[name](tiny_data)
    options = dict(task.hparams, channels_last=True)
    if name == "classification":
        options.update(lr=0.1, lr_reference_batch_size=256)  # its default: the rate per 256 images
        expected = 0.1 * 2 * 2 / 256  # batch 2 per device x 1 device x 2 accumulated
    else:
        options.update(lr=0.01, lr_reference_batch_size=16)
        expected = 0.01 * datamodule.batch_size * 2 / 16
    return task_class(**options), datamodule, expected


@pytest.mark.parametrize("task_name", list(worker.TASKS))
def test_lr_scales_with_the_global_batch_and_channels_last_reaches_the_convolutions(task_name, tiny_data, tmp_path):
    task, datamodule, expected_lr = _fit_setup(task_name, tiny_data)
    outputs = []

    def first_conv_output(module, args, output):
        outputs.append(output.is_contiguous(memory_format=torch.channels_last))

    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("lightning.pytorch").addHandler(handler)
    try:
        trainer = worker.trainer(tmp_path, devices=1, accumulate_grad_batches=2, max_steps=1, limit_val_batches=1)
        trainer.fit(task, datamodule=datamodule)
    finally:
        logging.getLogger("lightning.pytorch").removeHandler(handler)
    assert all(g["initial_lr"] == pytest.approx(expected_lr) for g in trainer.optimizers[0].param_groups)
    assert any(m.startswith(f"learning rate {expected_lr:.4g} = ") and "x global batch" in m for m in messages)

    conv = next(m for m in task.model.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    conv.register_forward_hook(first_conv_output)
    trainer.validate(task, datamodule=datamodule, verbose=False)
    assert outputs and all(outputs)


RECORDER = """#!{python}
# Stands in for python in tools/gpu_check.sh: records each tool command; a fit leaves an empty last.ckpt
import json, pathlib, sys
args = sys.argv[1:]
if args[0] != "-c":  # not the preflight check
    with open({log!r}, "a") as log:
        log.write(json.dumps(args) + "\\n")
    if args[1] == "fit":
        folder = pathlib.Path(args[args.index("--trainer.default_root_dir") + 1]) / "checkpoints"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "last.ckpt").touch()
"""


def test_gpu_check_commands_parse_with_the_tools(tmp_path):
    # The script runs only on a GPU machine: here each command it would run is recorded and parsed by its
    # tool's CLI, so a renamed option or a missing config fails here, not on the GPU.
    log = tmp_path / "commands.jsonl"
    recorder = tmp_path / "python"
    recorder.write_text(RECORDER.format(python=sys.executable, log=str(log)))
    recorder.chmod(0o755)
    script = ROOT / "tools" / "gpu_check.sh"
    env = {**os.environ, "PYTHON": str(recorder), "ACCELERATOR": "cpu"}
    subprocess.run(["bash", str(script), str(tmp_path / "work")], env=env, capture_output=True, check=False)
    commands = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(Path(c[0]).name, c[1]) for c in commands] == [
        (f"train_{task}.py", step) for task in ("det", "seg", "cls") for step in ("fit", "validate")
    ]
    for tool, subcommand, *args in commands:
        if "--ckpt_path" in args:  # the recorded checkpoint is empty; parsing the rest is the check
            del args[args.index("--ckpt_path") : args.index("--ckpt_path") + 2]
        cli = load_tool(Path(tool).stem).main(args, run=False)
        assert cli.model.hparams.channels_last and cli.trainer.precision == "bf16-mixed", (tool, subcommand)
