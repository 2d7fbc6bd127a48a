"""Two "nodes" on this machine (torchrun --nnodes 2, one process each, separate caches) validate as one process does.

Each node builds its own annotation store (its own `$RESBONE_CACHE`); the validation images are split
over the two processes, and the metrics, gathered over both, equal a single process's.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backbones.data.shapes import generate_shapes
from detection.task import DetectionTask
from tests import distributed_worker as worker

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 900


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _validate_args(shapes: Path, checkpoint: Path, out: Path) -> list[str]:
    options = json.dumps(worker.TINY_DETECTOR)
    return [
        str(ROOT / "tools" / "train_det.py"), "validate",
        "--data=detection.data.ShapesDataModule", f"--data.root={shapes}", "--data.num_workers=0",
        *(f"--data.{key}={value}" for key, value in worker.SHAPES.items()),
        "--model.model=faster_rcnn_r18_fpn", f"--model.model_options={options}",
        f"--ckpt_path={checkpoint}", "--trainer.accelerator=cpu", "--trainer.devices=1",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={out}",
        "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={out}",
    ]  # fmt: skip


def _metrics(out: Path) -> dict[str, float]:
    (path,) = out.rglob("metrics.csv")
    (row,) = list(csv.DictReader(path.open()))
    return {key: float(value) for key, value in row.items() if value and key.startswith("val_")}


@pytest.mark.slow
def test_two_nodes_validate_as_one_process(tmp_path):
    shapes = tmp_path / "shapes"
    generate_shapes(shapes, **worker.SHAPES)
    task = DetectionTask(model="faster_rcnn_r18_fpn", num_classes=4, model_options=worker.TINY_DETECTOR)
    checkpoint = tmp_path / "model.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                "pytorch-lightning_version": "2.6.6"}, checkpoint)  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    port = _free_port()
    nodes = []
    for rank in range(2):
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
            "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
            *_validate_args(shapes, checkpoint, tmp_path / f"node{rank}"),
            "--trainer.num_nodes=2", "--trainer.strategy=ddp",
        ]  # fmt: skip
        node_env = {**env, "RESBONE_CACHE": str(tmp_path / f"cache{rank}")}  # a node's own disk
        nodes.append(
            subprocess.Popen(command, cwd=ROOT, env=node_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    outputs = [node.communicate(timeout=TIMEOUT_S)[0].decode() for node in nodes]
    for node, output in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, output[-5000:]
    single = subprocess.run(
        [sys.executable, *_validate_args(shapes, checkpoint, tmp_path / "single")], cwd=ROOT,
        env={**env, "RESBONE_CACHE": str(tmp_path / "cache_single")}, capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]

    two_nodes, one_process = _metrics(tmp_path / "node0"), _metrics(tmp_path / "single")
    assert "val_bbox_AP" in one_process and set(two_nodes) == set(one_process)
    for key, value in one_process.items():
        assert two_nodes[key] == pytest.approx(value, rel=1e-6, abs=1e-9, nan_ok=True), key
    for cache in ("cache0", "cache1", "cache_single"):  # one store per annotation file on every node
        assert len(list((tmp_path / cache / "coco").glob("*/COMPLETE"))) == 1  # the validation JSON
