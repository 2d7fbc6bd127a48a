"""A misspelt model or option name in a training config: one line naming the closest, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tools.loader import load_tool

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "tool, config, option, line",
    [
        ("train_det", "detection/mask_rcnn_r18_fpn_shapes.yaml", "--model.model=mask_rcnn_r18_fnp",
         "train_det: error: unknown detection model 'mask_rcnn_r18_fnp'; closest: mask_rcnn_r18_fpn"),
        ("train_det", "detection/mask_rcnn_r18_fpn_shapes.yaml", '--model.model_options={"min_sise": 128}',
         "train_det: error: unknown option 'min_sise'; closest: min_size"),
        ("train_seg", "segmentation/deeplabv3plus_r18_os16_shapes.yaml", "--model.model=deeplabv3plus_r81",
         "train_seg: error: unknown segmentation model 'deeplabv3plus_r81'; closest: deeplabv3plus_r18"),
    ],
)  # fmt: skip
def test_a_typo_is_one_line_in_a_shell(tool, config, option, line, tmp_path):
    command = [sys.executable, str(ROOT / "tools" / f"{tool}.py"), "fit", f"--config={ROOT / 'configs' / config}",
               option, f"--trainer.default_root_dir={tmp_path}"]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert lines[-1].startswith(line) and lines[:-1] in ([], ["Seed set to 0"])  # Lightning's one log line


@pytest.mark.parametrize(
    "option, yaml, line",
    [
        ("--data.batch_sise=4", None, "unknown option 'data.batch_sise' of detection.data.ShapesDataModule; "
         "closest: data.batch_size"),
        (None, "data:\n  init_args:\n    batch_sise: 4\n", "unknown option 'data.batch_sise' of "
         "detection.data.ShapesDataModule; closest: data.batch_size"),
        (None, "trainer:\n  max_epohcs: 2\n", "unknown option 'trainer.max_epohcs'; closest: trainer.max_epochs"),
        (None, "trainr:\n  max_epochs: 2\n", "unknown option 'trainr.max_epochs'; closest: trainer.max_epochs"),
    ],
)  # fmt: skip
def test_a_misspelt_data_trainer_or_top_level_key_is_one_line(option, yaml, line, tmp_path, monkeypatch, capsys):
    """As for the model: `<tool>: error: unknown option ...; closest: ...`, exit status 2, no usage dump."""
    monkeypatch.setattr(sys, "argv", [str(ROOT / "tools" / "train_det.py")])
    args = ["fit", f"--config={ROOT / 'configs' / 'detection' / 'mask_rcnn_r18_fpn_shapes.yaml'}"]
    if yaml is not None:
        (tmp_path / "typo.yaml").write_text(yaml)
        args.append(f"--config={tmp_path / 'typo.yaml'}")
    with pytest.raises(SystemExit) as exit:
        load_tool("train_det").main([*args, *([option] if option else []), f"--trainer.default_root_dir={tmp_path}"])
    assert exit.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"train_det: error: {line}"), lines[-3:]
