"""Inference modes: sliding windows as MMSegmentation places and averages them, multi-scale + flip, the options' errors,
and the task's validation in each mode."""

import lightning as L
import pytest
import torch
from torch import nn

from backbones.weights import load_task_checkpoint
from segmentation.data import ShapesSegmentationDataModule
from segmentation.evaluation import SegmentationEvaluator
from segmentation.inference import SegmentationInference, slide_windows
from segmentation.task import SegmentationTask


def conv_net(kernel: int, seed: int = 0, classes: int = 5) -> nn.Module:
    """A small random conv net; with 3x3 kernels its output near a border depends on what the window sees."""
    torch.manual_seed(seed)
    pad = kernel // 2
    layers = [nn.Conv2d(3, 8, kernel, padding=pad), nn.ReLU(), nn.Conv2d(8, classes, kernel, padding=pad)]
    return nn.Sequential(*layers).eval()


def images(n: int = 2, height: int = 32, width: int = 48) -> torch.Tensor:
    return torch.rand(n, 3, height, width, generator=torch.Generator().manual_seed(1))


class Spy:
    """A forward that records the shapes it is called with."""

    def __init__(self, forward):
        self.forward, self.shapes = forward, []

    def __call__(self, x):
        self.shapes.append(tuple(x.shape))
        return self.forward(x)


def test_slide_windows_are_mmsegmentations():
    assert slide_windows((4, 11), (4, 4), (3, 3)) == [(0, 4, 0, 4), (0, 4, 3, 7), (0, 4, 6, 10), (0, 4, 7, 11)]
    rows, columns = ((0, 512), (341, 853), (512, 1024)), ((0, 1024), (683, 1707), (1024, 2048))
    assert slide_windows((1024, 2048), (512, 1024), (341, 683)) == [(*y, *x) for y in rows for x in columns]
    assert slide_windows((20, 30), (64, 64), (32, 32)) == [(0, 20, 0, 30)]  # a crop larger than the image is the image


@torch.no_grad()
def test_slide_with_stride_equal_to_crop_equals_the_tiles_one_by_one():
    net, x = conv_net(3), images()
    tiles = [[net(x[i : i + 1, :, y : y + 16, x0 : x0 + 24]) for x0 in (0, 24)] for y in (0, 16) for i in range(2)]
    expected = torch.cat([torch.cat([torch.cat(row, 3) for row in tiles[i::2]], 2) for i in range(2)])
    inference = SegmentationInference(mode="slide", crop_size=(16, 24), stride=(16, 24), window_batch_size=1)
    spy = Spy(net)
    assert torch.equal(inference(spy, x), expected)  # each window alone, summed onto zeros and divided by 1: exact
    assert spy.shapes == [(1, 3, 16, 24)] * 8
    batched = SegmentationInference(mode="slide", crop_size=16, stride=16 * 1, window_batch_size=8)
    assert batched.crop_size == (16, 16)
    together = SegmentationInference(mode="slide", crop_size=(16, 24), stride=(16, 24), window_batch_size=8)
    torch.testing.assert_close(together(net, x), expected, rtol=0, atol=1e-6)  # one batch: oneDNN may round otherwise
    assert not torch.equal(net(x), expected)  # the tiles' borders differ from the whole image's: the test can fail


@torch.no_grad()
def test_overlapping_windows_average_the_logits():
    """A model whose output is a known function of position: the input itself, ones, and each pixel's column and row
    inside its window. Width 11, crop 4, stride 3: windows at x 0, 3, 6 and 7 (shifted back); height 5, crop 4,
    stride 2: windows at y 0 and 1."""

    def forward(x):
        n, _, h, w = x.shape
        columns = torch.arange(w, dtype=x.dtype).expand(n, 1, h, w)
        rows = torch.arange(h, dtype=x.dtype).view(h, 1).expand(n, 1, h, w)
        return torch.cat([x[:, :1], torch.ones_like(columns), columns, rows], 1)

    x = images(2, 5, 11)
    inference = SegmentationInference(mode="slide", crop_size=(4, 4), stride=(2, 3), window_batch_size=3)
    spy = Spy(forward)
    out = inference(spy, x)  # 8 windows x 2 images in 6 batches: a batch mixes windows and images
    assert sorted(shape[0] for shape in spy.shapes) == [2, 2, 3, 3, 3, 3] and {shape[2:] for shape in spy.shapes} == {
        (4, 4)
    }
    torch.testing.assert_close(out[:, 0], x[:, 0], rtol=0, atol=1e-7)  # every window's crop lands where it came from
    assert torch.equal(out[:, 1], torch.ones(2, 5, 11))
    expected_columns = torch.tensor([0, 1, 2, 1.5, 1, 2, 1.5, 0.5, 1.5, 2.5, 3])
    expected_rows = torch.tensor([0, 0.5, 1.5, 2.5, 3])
    assert torch.equal(out[:, 2], expected_columns.expand(2, 5, 11))
    assert torch.equal(out[:, 3], expected_rows.view(5, 1).expand(2, 5, 11))


@torch.no_grad()
def test_a_crop_larger_than_the_image_is_the_whole_image():
    net, x = conv_net(3), images(1, 20, 30)
    spy = Spy(net)
    out = SegmentationInference(mode="slide", crop_size=(64, 64), stride=(32, 32))(spy, x)
    assert spy.shapes == [(1, 3, 20, 30)] and torch.equal(out, net(x))


@torch.no_grad()
def test_one_scale_without_flip_predicts_as_whole_bit_for_bit():
    net, x = conv_net(3), images()
    logits = SegmentationInference()(net, x)
    assert torch.equal(logits, net(x))
    probabilities = SegmentationInference(scales=[1.0])(net, x)
    assert probabilities.dtype == torch.float64 and torch.equal(probabilities, logits.double().softmax(1))
    assert torch.equal(probabilities.argmax(1), logits.argmax(1))
    # two classes one float32 step apart near 0: float32 softmax rounds them to one probability, float64 does not
    close = torch.zeros(1, 3, 2, 2)
    close[:, 0], close[:, 1] = 0.01, torch.nextafter(torch.tensor(0.01), torch.tensor(1.0))
    assert close.softmax(1)[0, 0, 0, 0] == close.softmax(1)[0, 1, 0, 0]
    tied = SegmentationInference(scales=[1.0])(lambda _: close, x[:1, :, :2, :2])
    assert torch.equal(tied.argmax(1), close.argmax(1)) and (close.argmax(1) == 1).all()


@torch.no_grad()
def test_flip_changes_nothing_for_a_left_right_equivariant_model():
    pointwise, x = conv_net(1), images()  # 1x1 convolutions: every pixel computed alone, so exactly equivariant
    one_scale = [SegmentationInference(scales=[1.0], flip=flip)(pointwise, x) for flip in (False, True)]
    assert torch.equal(*one_scale)  # (p + p) / 2 == p
    scales = (0.5, 1.0, 1.5)
    plain, flipped = (SegmentationInference(scales=scales, flip=flip)(pointwise, x) for flip in (False, True))
    torch.testing.assert_close(flipped, plain, rtol=0, atol=1e-12)  # sums of 6 views against 3 round differently
    assert torch.equal(flipped.argmax(1), plain.argmax(1))
    skewed = conv_net(3)  # 3x3 kernels with no mirror symmetry: the flip views differ
    assert not torch.allclose(*(SegmentationInference(scales=[1.0], flip=f)(skewed, x) for f in (False, True)))


@torch.no_grad()
def test_multi_scale_flip_averages_the_probabilities_of_every_view():
    net, x = conv_net(3), images()
    spy = Spy(net)
    out = SegmentationInference(scales=(0.5, 0.75, 1.0), flip=True)(spy, x, size=(40, 60))
    assert spy.shapes == [(4, 3, 16, 24), (4, 3, 24, 36), (4, 3, 32, 48)]  # each view batched with its mirror image
    assert out.shape == (2, 5, 40, 60) and out.dtype == torch.float64
    torch.testing.assert_close(out.sum(1), torch.ones(2, 40, 60, dtype=torch.float64))

    def view(scale, flip):
        resize = dict(mode="bilinear", align_corners=False)
        scaled = nn.functional.interpolate(x, scale_factor=scale, **resize) if scale != 1 else x
        logits = net(scaled.flip(-1)).flip(-1) if flip else net(scaled)
        return nn.functional.interpolate(logits, size=(40, 60), **resize).double().softmax(1)

    expected = sum(view(s, f) for s in (0.5, 0.75, 1.0) for f in (False, True)) / 6
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)  # one forward per view pair against one per view


@torch.no_grad()
def test_multi_scale_views_inferred_by_slide():
    net, x = conv_net(3), images(1)
    spy = Spy(net)
    inference = SegmentationInference(mode="slide", crop_size=(16, 16), stride=(12, 12), scales=(0.5, 1.0), flip=True)
    out = inference(spy, x)
    # scale 0.5 is 16x24: 2 windows x 2 views; scale 1 is 32x48: 3 x 4 windows x 2 views = 24, 8 at a time
    assert [s[0] for s in spy.shapes] == [4, 8, 8, 8] and {s[2:] for s in spy.shapes} == {(16, 16)}
    assert (
        out.shape == (1, 5, 32, 48) and "slide (crop 16x16, stride 12x12), scales 0.5, 1 + flip" in inference.describe()
    )


@pytest.mark.parametrize(
    "options, message",
    [({"mode": "tile"}, "inference mode='tile'; choose one of 'whole', 'slide'"),
     ({"mode": "slide", "crop_size": [32, 32], "stride": [33, 16]},
      "stride=[33, 16] exceeds crop_size=[32, 32] in height (33 > 32)"),
     ({"mode": "slide", "crop_size": [32, 0], "stride": [16, 16]}, "crop_size=[32, 0]; give two positive integers"),
     ({"mode": "slide", "crop_size": [32, 32, 3], "stride": [16, 16]}, "crop_size=[32, 32, 3]; give two positive"),
     ({"mode": "slide", "crop_size": [32, 32], "stride": [-1, 16]}, "stride=[-1, 16]; give two positive integers"),
     ({"mode": "slide", "crop_size": [32, 32]}, "mode='slide' needs crop_size and stride"),
     ({"crop_size": [32, 32], "stride": [16, 16]}, "are options of mode 'slide', but the mode is 'whole'"),
     ({"scales": []}, "scales=[]; give one or more positive factors"),
     ({"scales": [1.0, 0]}, "scales=[1.0, 0]; give one or more positive factors"),
     ({"window_batch_size": 0}, "window_batch_size=0; give a positive number"),
     ({"mode": "slide", "crop": 32}, "inference options ['crop'] unknown; choose from mode, crop_size, stride")],
)  # fmt: skip
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError) as error:
        SegmentationInference.create(options)
    assert message in str(error.value)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    datamodule = ShapesSegmentationDataModule(
        root=str(tmp_path_factory.mktemp("shapes")), num_train=2, num_val=2, image_size=40, batch_size=2, num_workers=0
    )
    torch.manual_seed(0)
    task = SegmentationTask(model="deeplabv3plus_r18", num_classes=4, model_options={"decoder_channels": 32})
    return datamodule, task.state_dict()


def validate(shapes, capsys, inference):
    datamodule, state = shapes
    task = SegmentationTask(
        model="deeplabv3plus_r18", num_classes=4, model_options={"decoder_channels": 32}, inference=inference
    )
    task.load_state_dict(state)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(task, datamodule, verbose=False)[0]
    task.trainer_used = trainer
    return task, metrics, capsys.readouterr().out


def test_task_validates_in_every_mode_and_the_table_says_which(shapes, capsys, tmp_path):
    whole, whole_metrics, whole_table = validate(shapes, capsys, None)
    evaluator = whole.evaluator("val")
    per_class = {f"val_IoU_{name}" for name in ("__background__", "circle", "square", "triangle")}
    summary = {"val_loss", "val_mIoU", "val_pixel_acc", "val_mean_acc"}
    assert "inference: whole\n" in whole_table and set(whole_metrics) - per_class == summary
    datamodule, _ = shapes
    whole.eval()
    with torch.no_grad():  # whole is the model's logits as they were before the modes existed
        batches = [(whole(x)["out"], y) for x, y in datamodule.val_dataloader()]
    direct = SegmentationEvaluator(4)
    for logits, masks in batches:
        direct.update(logits.argmax(1), masks)
    direct.compute()
    assert torch.equal(direct.total_confusion, evaluator.total_confusion)
    loss = sum(nn.functional.cross_entropy(logits, masks, ignore_index=255) for logits, masks in batches) / len(batches)
    assert whole_metrics["val_loss"] == pytest.approx(float(loss), rel=1e-6)
    one_scale, metrics, table = validate(shapes, capsys, {"scales": [1.0]})
    assert torch.equal(one_scale.evaluator("val").total_confusion, evaluator.total_confusion)
    assert metrics["val_mIoU"] == whole_metrics["val_mIoU"] and "inference: whole, scales 1 (probabilities" in table
    assert metrics["val_loss"] == pytest.approx(whole_metrics["val_loss"], rel=1e-5)  # -log softmax = cross-entropy
    slide = {"mode": "slide", "crop_size": [24, 24], "stride": [16, 16], "window_batch_size": 4}
    task, metrics, table = validate(shapes, capsys, {**slide, "scales": [0.75, 1.25], "flip": True})
    assert "inference: slide (crop 24x24, stride 16x16), scales 0.75, 1.25 + flip (probabilities averaged)\n" in table
    assert int(task.evaluator("val").total_confusion.sum()) == int(evaluator.total_confusion.sum())
    assert 0 <= metrics["val_mIoU"] <= 1 and metrics["val_loss"] > 0
    # the option survives a checkpoint as plain values, which weights_only loading reads
    task.trainer_used.save_checkpoint(tmp_path / "slide.ckpt")
    loaded = load_task_checkpoint(SegmentationTask, tmp_path / "slide.ckpt")
    assert loaded.inference == task.inference and loaded.hparams.inference["crop_size"] == [24, 24]


def test_predict_step_uses_the_mode(shapes):
    _, state = shapes
    task = SegmentationTask(model="deeplabv3plus_r18", num_classes=4, model_options={"decoder_channels": 32},
                            inference={"mode": "slide", "crop_size": [24, 24], "stride": [24, 24]})  # fmt: skip
    task.load_state_dict(state)
    task.eval()
    x = images(1, 48, 48)
    with torch.no_grad():
        labels = task.predict_step((x, None), 0)
        tiles = [task(x[:, :, y : y + 24, c : c + 24])["out"] for y in (0, 24) for c in (0, 24)]
    expected = torch.cat([torch.cat(tiles[:2], 3), torch.cat(tiles[2:], 3)], 2).argmax(1)
    assert labels.shape == (1, 48, 48) and torch.equal(labels, expected)
