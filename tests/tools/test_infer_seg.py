"""tools/infer_seg.py on a checkpoint from a one-step fit."""

import cv2
import numpy as np
import pytest

from segmentation.data import ShapesSegmentationDataModule
from segmentation.task import SegmentationTask
from tests.tools.loader import fit_one_step, load_tool

infer_seg = load_tool("infer_seg")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    datamodule = ShapesSegmentationDataModule(
        root=str(root / "shapes"), num_train=2, num_val=2, image_size=40, batch_size=2, num_workers=0
    )
    task = SegmentationTask(model="deeplabv3plus_r18", output_stride=16, model_options={"decoder_channels": 32})
    return fit_one_step(task, datamodule, root), datamodule.root / "val"


def test_overlays_for_a_folder_and_an_image(checkpoint, tmp_path):
    path, images = checkpoint
    written = infer_seg.main([str(path), str(images), "--output", str(tmp_path / "out"), "--save-masks"])
    assert [p.name for p in written] == ["000001_overlay.png", "000002_overlay.png"]
    overlay = cv2.imread(str(written[0]))
    mask = cv2.imread(str(tmp_path / "out" / "000001_mask.png"), cv2.IMREAD_UNCHANGED)
    assert overlay.shape == (40, 40, 3) and mask.shape == (40, 40) and mask.max() < 4
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left behind
    single = infer_seg.main([str(path), str(images / "000002.jpg"), "--output", str(tmp_path / "one"), "--size", "64"])
    assert [p.name for p in single] == ["000002_overlay.png"]


def test_checkpoint_keeps_classes_for_inference(checkpoint):
    task = infer_seg.load_task(checkpoint[0], "cpu")
    assert task.hparams.num_classes == 4 and task.hparams.class_names[0] == "__background__"


def test_overlay_leaves_background_uncoloured():
    image = np.full((2, 2, 3), 100, np.uint8)
    labels = np.array([[0, 1], [2, 0]])
    result = infer_seg.overlay(image, labels, ["background", "a", "b"], alpha=1.0)
    assert (result[0, 0] == 100).all() and (result[0, 1] == infer_seg.palette(3)[1]).all()


@pytest.mark.parametrize("which", ["checkpoint", "input"])
def test_missing_path_is_a_clear_error(checkpoint, tmp_path, capsys, which):
    args = {"checkpoint": str(checkpoint[0]), "input": str(checkpoint[1])}
    args[which] = str(tmp_path / "nowhere")
    with pytest.raises(SystemExit) as error:
        infer_seg.main([args["checkpoint"], args["input"], "--output", str(tmp_path / "out")])
    assert error.value.code == 2
    assert f"{which} '{tmp_path / 'nowhere'}' does not exist" in capsys.readouterr().err


def test_fused_fast_path_gives_the_masks_of_the_unfused_model(checkpoint, tmp_path):
    path, images = checkpoint
    for flags, name in (([], "fast"), (["--no-fuse"], "plain")):
        infer_seg.main([str(path), str(images), "--output", str(tmp_path / name), "--save-masks", *flags])
    for mask in ("000001_mask.png", "000002_mask.png"):
        fast = cv2.imread(str(tmp_path / "fast" / mask), cv2.IMREAD_UNCHANGED)
        plain = cv2.imread(str(tmp_path / "plain" / mask), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(fast, plain)
