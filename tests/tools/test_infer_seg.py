"""tools/infer_seg.py on a checkpoint from a one-step fit."""

import shutil

import cv2
import numpy as np
import pytest
import torch

from backbones.data.images import read_rgb_image
from segmentation.inference import SegmentationInference
from tests.tools.loader import load_tool, run_tool

infer_seg = load_tool("infer_seg")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def checkpoint(segmentation_checkpoint):
    """The session's one-step DeepLabV3+ (tests/conftest.py) and its 3 validation images."""
    return segmentation_checkpoint.path, segmentation_checkpoint.images


def _images(folder):
    return [read_rgb_image(path) for path in sorted(folder.glob("*.jpg"))]


def _assert_same_logits(actual, expected, what):
    """Equal to a tolerance well below how much the logits vary, so that a real difference is caught."""
    spread = (expected - expected.mean(1, keepdim=True)).std().item()  # across classes and pixels
    tolerance = 1e-3 * spread
    assert spread > 0 and torch.isfinite(actual).all()
    torch.testing.assert_close(actual, expected, rtol=0, atol=tolerance, msg=lambda m: f"{what}: {m}")


def test_overlays_for_a_folder_and_an_image(checkpoint, tmp_path):
    path, images = checkpoint
    assert infer_seg.main([str(path), str(images), "--output", str(tmp_path / "out"), "--save-masks"]) == 0
    names = ["000001_mask.png", "000001_overlay.png", "000002_mask.png", "000002_overlay.png", "000003_mask.png",
             "000003_overlay.png"]  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == names  # no temporary files left behind
    overlay = cv2.imread(str(tmp_path / "out" / "000001_overlay.png"))
    mask = cv2.imread(str(tmp_path / "out" / "000001_mask.png"), cv2.IMREAD_UNCHANGED)
    assert overlay.shape == (40, 40, 3) and mask.shape == (40, 40) and mask.max() < 4
    single = [str(path), str(images / "000002.jpg"), "--output", str(tmp_path / "one"), "--size", "64"]
    assert infer_seg.main(single) == 0
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["000002_overlay.png"]


def test_checkpoint_keeps_classes_for_inference(checkpoint):
    segmenter = infer_seg.load_model(checkpoint[0], CPU)
    assert segmenter.class_names == ["__background__", "circle", "square", "triangle"]


def test_overlay_leaves_background_uncoloured():
    image = np.full((2, 2, 3), 100, np.uint8)
    labels = np.array([[0, 1], [2, 0]])
    result = infer_seg.overlay(image, labels, ["background", "a", "b"], alpha=1.0)
    assert (result[0, 0] == 100).all() and (result[0, 1] == infer_seg.palette(3)[1]).all()


@pytest.mark.parametrize("which", ["checkpoint", "source"])
def test_missing_path_is_one_error_line(checkpoint, tmp_path, capsys, which):
    args = {"checkpoint": str(checkpoint[0]), "source": str(checkpoint[1])}
    args[which] = str(tmp_path / "nowhere")
    assert infer_seg.main([args["checkpoint"], args["source"], "--output", str(tmp_path / "out")]) == 2
    message = {"checkpoint": f"checkpoint '{tmp_path / 'nowhere'}' does not exist",
               "source": f"{tmp_path / 'nowhere'}: no such image or folder"}[which]  # fmt: skip
    assert capsys.readouterr().err == f"infer_seg: error: {message}\n"
    assert not (tmp_path / "out").exists()


def test_fused_fast_path_gives_the_logits_of_the_unfused_model(checkpoint):
    path, images = checkpoint
    batch = _images(images)
    fast, plain = (infer_seg.load_model(path, CPU, fuse=fuse).model for fuse in (True, False))
    _assert_same_logits(infer_seg.predict(fast, batch, CPU), infer_seg.predict(plain, batch, CPU), "fused")


def test_a_batch_gives_the_logits_of_single_images(checkpoint):
    path, images = checkpoint
    batch = _images(images)
    model = infer_seg.load_model(path, CPU).model
    together = infer_seg.predict(model, batch, CPU)
    one_by_one = torch.cat([infer_seg.predict(model, [image], CPU) for image in batch])
    assert together.shape == (3, 4, 40, 40)
    _assert_same_logits(together, one_by_one, "batched")


def test_bf16_runs_the_network_in_bf16_and_returns_fp32_logits(checkpoint, tmp_path):
    path, images = checkpoint
    batch = _images(images)
    segmenter = infer_seg.load_model(path, CPU)
    dtypes = []
    segmenter.model.model.backbone.register_forward_hook(
        lambda module, inputs, output: dtypes.extend(v.dtype for v in output.values())
    )
    logits = infer_seg.predict(segmenter.model, batch, CPU, "bf16")
    assert set(dtypes) == {torch.bfloat16}
    reference = infer_seg.predict(segmenter.model, batch, CPU, "fp32")
    assert logits.dtype == torch.float32 and logits.shape == reference.shape
    assert (logits - reference).abs().max() < 0.1 * reference.abs().max()  # bf16 keeps about 3 digits
    args = [str(path), str(images), "--output", str(tmp_path / "bf16"), "--precision", "bf16", "--batch-size", "2"]
    assert infer_seg.main(args) == 0
    assert len(list((tmp_path / "bf16").glob("*_overlay.png"))) == 3


def test_batches_hold_one_image_size(checkpoint, tmp_path, monkeypatch):
    path, images = checkpoint
    source = shutil.copytree(images, tmp_path / "images")
    image = cv2.imread(str(source / "000002.jpg"))
    cv2.imwrite(str(source / "000002.jpg"), cv2.resize(image, (48, 40)))  # (H, W) 40 x 48
    sizes, original = [], infer_seg.predict

    def spy(model, batch, *args):
        sizes.append([image.shape[:2] for image in batch])
        return original(model, batch, *args)

    monkeypatch.setattr(infer_seg, "predict", spy)
    assert infer_seg.main([str(path), str(source), "--output", str(tmp_path / "out"), "--batch-size", "3"]) == 0
    assert sizes == [[(40, 40)], [(40, 48)], [(40, 40)]]
    assert cv2.imread(str(tmp_path / "out" / "000002_overlay.png")).shape == (40, 48, 3)


def test_recursive_mirrors_subfolders_as_infer_det_does(checkpoint, tmp_path):
    path, images = checkpoint
    source = tmp_path / "source"
    (source / "a").mkdir(parents=True)
    shutil.copy(images / "000001.jpg", source / "a" / "000001.jpg")
    shutil.copy(images / "000002.jpg", source / "000002.jpg")
    out = tmp_path / "out"
    done = run_tool("infer_seg", path, source, "--output", out, "--recursive", "--save-masks")
    assert done.returncode == 0, done.stderr
    assert "wrote 2 overlays and masks" in done.stdout and "images/s)" in done.stdout
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "000002_mask.png", "000002_overlay.png", "a/000001_mask.png", "a/000001_overlay.png",
    ]  # fmt: skip


def test_inference_modes_from_the_command_line(checkpoint, tmp_path):
    """`--mode slide` with stride = crop gives the tiles' logits; `--scales 1.0` predicts as whole; `--flip` runs."""
    path, images = checkpoint
    batch = _images(images)
    model = infer_seg.load_model(path, CPU).model
    args = infer_seg.parse_args([str(path), str(images), "--mode", "slide", "--crop-size", "20", "24", "--stride",
                                 "20", "16", "--window-batch-size", "1"])  # fmt: skip
    assert args.inference == SegmentationInference(
        mode="slide", crop_size=(20, 24), stride=(20, 16), window_batch_size=1
    )
    slide = infer_seg.predict(model, batch[:1], CPU, inference=args.inference)
    whole = infer_seg.predict(model, batch[:1], CPU)
    x = torch.from_numpy(batch[0]).permute(2, 0, 1)[None].float().div(255)
    with torch.inference_mode():  # windows x 0-24 and 16-40: the columns 16-24 are the mean of both
        tiles = [[model(x[..., y : y + 20, c : c + 24])["out"] for c in (0, 16)] for y in (0, 20)]
    expected = torch.zeros_like(whole)
    for y, row in zip((0, 20), tiles, strict=True):
        expected[..., y : y + 20, :24] += row[0]
        expected[..., y : y + 20, 16:] += row[1]
    expected[..., 16:24] /= 2
    torch.testing.assert_close(slide, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(slide, whole, atol=1e-3)  # the windows see less context than the whole image
    one_scale = infer_seg.parse_args([str(path), str(images), "--scales", "1.0"]).inference
    assert torch.equal(infer_seg.predict(model, batch, CPU, inference=one_scale).argmax(1),
                       infer_seg.predict(model, batch, CPU).argmax(1))  # fmt: skip
    out = tmp_path / "tta"
    tta = ["--scales", "0.5", "1.0", "--flip", "--mode", "slide", "--crop-size", "24", "24", "--stride", "16", "16"]
    assert infer_seg.main([str(path), str(images), "--output", str(out), *tta, "--save-masks"]) == 0
    assert cv2.imread(str(out / "000001_mask.png"), cv2.IMREAD_UNCHANGED).shape == (40, 40)


@pytest.mark.parametrize(
    "options, message",
    [(["--mode", "slide"], "inference mode='slide' needs crop_size and stride"),
     (["--mode", "slide", "--crop-size", "16", "16", "--stride", "24", "8"],
      "stride=[24, 8] exceeds crop_size=[16, 16] in height (24 > 16)"),
     (["--mode", "slide", "--crop-size", "0", "16", "--stride", "8", "8"], "crop_size=[0, 16]; give two positive"),
     (["--crop-size", "16", "16", "--stride", "8", "8"], "are options of mode 'slide', but the mode is 'whole'"),
     (["--mode", "tiles"], "argument --mode: invalid choice: 'tiles'"),
     (["--scales", "1.0", "-0.5"], "scales=[1.0, -0.5]; give one or more positive factors")],
)  # fmt: skip
def test_bad_inference_options_are_one_error_line(checkpoint, tmp_path, capsys, options, message):
    with pytest.raises(SystemExit) as exit_:
        infer_seg.main([str(checkpoint[0]), str(checkpoint[1]), "--output", str(tmp_path / "out"), *options])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "infer_seg: error: " in err and message in err, err
    assert not (tmp_path / "out").exists()
