"""Bad input to every data module and tool, in one place.

Each bad input must give an error that names the culprit (the file, the key, the value) and what
was expected. The tools with their own command line (infer_det, infer_seg, eval_det,
export_backbone, model_info) print one line and exit with status 2, leaving no partial output file;
the LightningCLI training tools (train_det, train_seg, train_cls) raise the error, so their process
exits non-zero with the message as its last line. A checkpoint that would run code when unpickled is
refused by every door that reads checkpoints, and its code never runs.

Most cases call a tool's `main([...])` in the test process; a few run it as a subprocess to show the
exit status a shell sees.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch

from backbones import WeightsError, create_backbone, create_model
from backbones.classification import ClassificationTask, ImageFolderDataModule
from backbones.data.shapes import generate_shapes
from detection.data import CocoDetectionDataModule
from detection.models import build_model as build_detector
from detection.task import DetectionTask
from segmentation.data import CocoSegmentationDataModule, FolderSegmentationDataModule
from segmentation.models import build_model as build_segmenter
from segmentation.task import SegmentationTask
from tests.tools.loader import load_tool, run_tool

eval_det = load_tool("eval_det")
export_backbone = load_tool("export_backbone")
infer_det = load_tool("infer_det")
infer_seg = load_tool("infer_seg")
model_info = load_tool("model_info")
train_cls = load_tool("train_cls")
train_det = load_tool("train_det")
train_seg = load_tool("train_seg")

CATEGORY_NAMES = ["__background__", "circle", "square", "triangle"]


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Two 48 px images per split, COCO JSON (category ids 1, 3, 7) and semantic mask PNGs."""
    return generate_shapes(tmp_path_factory.mktemp("bad_input") / "shapes", num_train=2, num_val=2, image_size=48)


@pytest.fixture
def coco(shapes, tmp_path):
    """A private copy of the val images and JSON, free to damage."""
    images = Path(shutil.copytree(shapes.val_images, tmp_path / "images"))
    annotations = tmp_path / "instances.json"
    shutil.copy(shapes.val_annotations, annotations)
    return images, annotations


def _save_task(task: L.LightningModule, path: Path) -> str:
    """A checkpoint as Lightning writes it, without training: weights and hyper-parameters."""
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                "pytorch-lightning_version": L.__version__}, path)  # fmt: skip
    return str(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One checkpoint per task, of tiny models."""
    folder = tmp_path_factory.mktemp("checkpoints")
    detector = DetectionTask(
        model="faster_rcnn_r18_fpn", num_classes=4, model_options={"min_size": 48, "max_size": 48},
        class_names=CATEGORY_NAMES, label_to_category_id={1: 1, 2: 3, 3: 7},
    )  # fmt: skip
    names = ["background", *CATEGORY_NAMES[1:]]
    segmenter = SegmentationTask(model="deeplabv3plus_r18", num_classes=4, class_names=names)
    classifier = ClassificationTask(model="resnet18", num_classes=3, class_names=["a", "b", "c"])
    return {
        "detection": _save_task(detector, folder / "detection.ckpt"),
        "segmentation": _save_task(segmenter, folder / "segmentation.ckpt"),
        "classification": _save_task(classifier, folder / "classification.ckpt"),
    }


class _RunsCode:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


@pytest.fixture
def evil(tmp_path):
    """A checkpoint-looking file whose unpickling would create `marker`; the test checks it never appears."""
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"model.conv1.weight": torch.zeros(1)}, "hyper_parameters": {}, "x": _RunsCode(marker)}
    torch.save(payload, path)
    yield str(path)
    assert not marker.exists(), "unpickling ran the payload"


def _truncated(source: str | Path, path: Path) -> str:
    data = Path(source).read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return str(path)


def _corrupt_image(path: Path) -> None:
    path.write_bytes(b"\x89PNG but not really an image")


def _truncate_image(path: Path) -> None:
    data = path.read_bytes()  # a JPEG cut at 80%: OpenCV alone would decode it with grey fill
    path.write_bytes(data[: len(data) * 4 // 5])


def _edit_json(path: Path, edit) -> None:
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))


def _rle(height: int, width: int) -> dict:
    rle = mask_utils.encode(np.asfortranarray(np.ones((height, width), np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def _leftovers(folder: Path) -> list[str]:
    """Temporary files a writer left behind."""
    if not folder.exists():
        return []
    return [p.name for p in folder.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]


# ------------------------------------------------------------------------------------------ data modules


def _damage(case: str, images: Path, annotations: Path) -> str:
    """Damages a COCO copy; returns the text the error must contain."""
    first = min(images.glob("*.jpg"))
    if case == "missing image":
        first.unlink()
        return f"missing from {images}, e.g. {first.name}"
    if case == "corrupt image":
        _corrupt_image(first)
        return f"{first}: cannot be decoded"
    if case == "truncated image":
        _truncate_image(first)
        return f"{first}: truncated JPEG"
    if case == "malformed JSON":
        annotations.write_text('{"images": [{"id": 1,')
        return f"{annotations}: invalid JSON at line 1"
    if case == "unknown category id":
        _edit_json(annotations, lambda c: c["annotations"][0].update(category_id=99))
        return "annotation id 1 "
    assert case == "mask of the wrong size"
    _edit_json(annotations, lambda c: c["annotations"][0].update(segmentation=_rle(10, 12)))
    return "annotation id 1 has a 10x12 (HxW) mask, but its image 1 is 48x48"


COCO_CASES = ["missing image", "corrupt image", "truncated image", "malformed JSON", "unknown category id",
              "mask of the wrong size"]  # fmt: skip


def _first_val_batch(datamodule: L.LightningDataModule):
    datamodule.setup("validate")
    return next(iter(datamodule.val_dataloader()))


@pytest.mark.parametrize("case", COCO_CASES)
def test_detection_data_names_the_culprit(coco, case):
    images, annotations = coco
    message = _damage(case, images, annotations)
    datamodule = CocoDetectionDataModule(
        val_images=str(images), val_annotations=str(annotations), with_masks=True, num_workers=0
    )
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        _first_val_batch(datamodule)
    assert message in str(error.value)
    if case == "unknown category id":
        assert "category_id 99, which is not among the categories; allowed ids: [1, 3, 7]" in str(error.value)


@pytest.mark.parametrize("case", COCO_CASES)
def test_segmentation_coco_data_names_the_culprit(coco, case):
    images, annotations = coco
    message = _damage(case, images, annotations)
    datamodule = CocoSegmentationDataModule(val_images=str(images), val_annotations=str(annotations), num_workers=0)
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        _first_val_batch(datamodule)
    assert message in str(error.value)  # the same checks and messages as detection's (backbones.data.coco)
    if case == "unknown category id":
        assert "category_id 99, which is not among the categories; allowed ids: [1, 3, 7]" in str(error.value)


def test_segmentation_category_ids_must_exist(coco):
    images, annotations = coco
    datamodule = CocoSegmentationDataModule(
        val_images=str(images), val_annotations=str(annotations), category_ids=[1, 5]
    )
    with pytest.raises(ValueError, match=r"category_ids=\[1, 5\]: unknown \[5\].*has \[1, 3, 7\]"):
        _ = datamodule.num_classes


def test_negative_and_empty_boxes_are_dropped_with_their_ids(coco, caplog):
    images, annotations = coco

    def degenerate(content):
        content["annotations"][0]["bbox"][2] = -4.0  # negative width
        content["annotations"][1]["bbox"][3] = 0.0  # empty

    _edit_json(annotations, degenerate)
    datamodule = CocoDetectionDataModule(val_images=str(images), val_annotations=str(annotations), num_workers=0)
    with caplog.at_level(logging.WARNING, logger="detection.coco"):
        datamodule.setup("validate")
    assert "dropped 2 box(es) with zero or negative width or height" in caplog.text
    assert "inside the image (annotation ids 1, 2)" in caplog.text
    dataset = datamodule.datasets["val"]
    kept = sum(len(dataset[i][1]["boxes"]) for i in range(len(dataset)))
    assert kept == len(json.loads(annotations.read_text())["annotations"]) - 2


@pytest.fixture
def folder(shapes, tmp_path):
    """Image and mask folders (VOC layout) copied from the shapes."""
    images = Path(shutil.copytree(shapes.val_images, tmp_path / "images"))
    masks = Path(shutil.copytree(shapes.val_masks, tmp_path / "masks"))
    return images, masks


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing mask", "1 of 2 images have no mask, e.g. {images}/000001.jpg -> {masks}/000001.png"),
        ("corrupt mask", "{masks}/000001.png: cannot be decoded as a label image"),
        ("mask of the wrong size", "{masks}/000001.png: size 20x30 (HxW) differs from its image {images}/000001.jpg"),
        ("label outside the classes", "{masks}/000001.png: label values [9] are outside the classes 0..3"),
        ("colour mask", "{masks}/000001.png: a RGB colour image; label masks must hold one class index per pixel"),
        ("truncated image", "{images}/000001.jpg: truncated JPEG"),
    ],
)
def test_segmentation_folder_data_names_the_culprit(folder, case, message):
    images, masks = folder
    mask = masks / "000001.png"
    if case == "missing mask":
        mask.unlink()
    elif case == "corrupt mask":
        _corrupt_image(mask)
    elif case == "mask of the wrong size":
        cv2.imwrite(str(mask), np.zeros((20, 30), np.uint8))
    elif case == "label outside the classes":
        cv2.imwrite(str(mask), np.full((48, 48), 9, np.uint8))
    elif case == "colour mask":
        from PIL import Image

        Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(mask)
    else:
        _truncate_image(images / "000001.jpg")
    datamodule = FolderSegmentationDataModule(
        num_classes=4, val_images=str(images), val_masks=str(masks), num_workers=0
    )
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        _first_val_batch(datamodule)
    assert message.format(images=images, masks=masks) in str(error.value)


@pytest.fixture
def class_folders(tmp_path):
    """ImageNet layout: val/<class>/<image>.png, two classes of two images."""
    noise = np.random.default_rng(0).integers(0, 256, (4, 40, 40, 3), dtype=np.uint8)  # mostly scan data
    for k, name in enumerate(("cat", "dog")):
        (tmp_path / "val" / name).mkdir(parents=True)
        for i in range(2):
            cv2.imwrite(str(tmp_path / "val" / name / f"{i}.jpg"), noise[2 * k + i])
    return tmp_path / "val"


@pytest.mark.parametrize("case", ["missing folder", "empty class", "corrupt image", "truncated image"])
def test_classification_data_names_the_culprit(class_folders, case):
    culprit = class_folders / "dog" / "0.jpg"
    message = f"{culprit}: "
    if case == "missing folder":
        shutil.rmtree(class_folders)
        message = f"image folder {class_folders} does not exist"
    elif case == "empty class":
        for path in (class_folders / "dog").iterdir():
            path.unlink()
        message = f"class folder {class_folders / 'dog'} holds no images"
    elif case == "corrupt image":
        _corrupt_image(culprit)
    else:
        _truncate_image(culprit)
        message = f"{culprit}: truncated JPEG"
    datamodule = ImageFolderDataModule(val_dir=str(class_folders), num_workers=0, crop_size=32, resize_size=36)
    with pytest.raises(ValueError) as error:
        datamodule.setup("validate")
        for _ in datamodule.val_dataloader():
            pass
    assert message in str(error.value)


# ---------------------------------------------------------------------------------- names and settings


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: build_detector("faster_rcnn_r19_fpn", num_classes=4), "model 'faster_rcnn_r19_fpn'; closest: faster"),
        (lambda: build_detector("faster_rcnn", num_classes=4, backbone="resnet5"), "unknown backbone 'resnet5'"),
        (lambda: build_detector("faster_rcnn", num_classes=4, neck="bifpn"), "neck='bifpn'; choose one of 'fpn'"),
        (lambda: build_segmenter("deeplabv4", num_classes=4), "model 'deeplabv4'; closest: deeplabv3"),
        (lambda: build_segmenter("deeplabv3_r18", num_classes=4, output_stride=12), "output_stride=12; choose 8"),
        (lambda: create_backbone("resnet18", output_stride=12), "output_stride=12; choose 8, 16 or 32"),
        (lambda: create_model("resnet5"), "unknown backbone 'resnet5'; closest: resnet50"),
    ],
    ids=["detector", "detector backbone", "neck", "segmenter", "segmenter stride", "backbone stride", "classifier"],
)
def test_unknown_names_and_settings_are_named(build, message):
    with pytest.raises((ValueError, KeyError)) as error:
        build()
    assert message in str(error.value)


# --------------------------------------------------------------------------------------------- weights


@pytest.mark.parametrize("door", ["backbone", "detector", "segmenter"])
def test_pickle_that_would_run_code_is_refused_by_every_weights_door(evil, door):
    load = {
        "backbone": lambda: create_backbone("resnet18", weights=evil),
        "detector": lambda: build_detector("faster_rcnn_r18_fpn", num_classes=4, weights=evil),
        "segmenter": lambda: build_segmenter("deeplabv3_r18", num_classes=4, weights=evil),
    }[door]
    with pytest.raises(WeightsError, match=rf"refused to load '{evil}'.*GLOBAL posix.system"):
        load()


@pytest.mark.parametrize("tool", ["train_det", "train_seg", "train_cls"])
def test_pickle_that_would_run_code_is_refused_as_ckpt_path(evil, tool, tmp_path):
    main, data = {
        "train_det": (train_det.main, "detection.data.ShapesDataModule"),
        "train_seg": (train_seg.main, "segmentation.data.ShapesSegmentationDataModule"),
        "train_cls": (train_cls.main, "backbones.classification.ShapesClassificationDataModule"),
    }[tool]
    # torch.load(weights_only=True) in LightningCLI
    with pytest.raises(Exception, match=re.escape("GLOBAL posix.system")):
        main(["fit", f"--data={data}", f"--ckpt_path={evil}", f"--trainer.default_root_dir={tmp_path}"])


def test_weights_of_another_architecture_name_the_keys(checkpoints):
    with pytest.raises(WeightsError) as error:
        build_detector("faster_rcnn_r18_fpn", num_classes=4, weights=checkpoints["segmentation"])
    message = str(error.value)
    assert f"weights '{checkpoints['segmentation']}' do not fit FasterRCNN" in message
    assert "missing keys (30): backbone.fpn.inner_blocks.0.0.weight" in message and "rpn.head.cls_logits" in message
    assert "fresh_heads=True" not in message  # fresh heads would not help here


# ----------------------------------------------------------------------------------------------- tools


def test_infer_det_bad_checkpoints_exit_2(checkpoints, evil, shapes, tmp_path, capsys):
    image = str(min(shapes.val_images.glob("*.jpg")))
    cases = {
        evil: f"refused to load '{evil}'",
        _truncated(checkpoints["detection"], tmp_path / "cut.ckpt"): "the file is truncated or corrupt",
        # another task's: what it is and which tool takes it
        checkpoints["segmentation"]: "segmentation.ckpt' is a segmentation checkpoint, not a detection one",
        checkpoints["classification"]: "is a classification checkpoint, not a detection one",
        str(tmp_path / "nowhere.ckpt"): f"checkpoint '{tmp_path / 'nowhere.ckpt'}' does not exist",
    }
    for checkpoint, message in cases.items():
        output = tmp_path / "out"
        assert infer_det.main([checkpoint, image, "--output", str(output)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("infer_det: error: ") and message in err, err
        assert not output.exists() or not list(output.iterdir())


def test_infer_det_bad_images_exit_2_without_results(checkpoints, shapes, tmp_path, capsys):
    images = Path(shutil.copytree(shapes.val_images, tmp_path / "images"))
    _truncate_image(images / "000002.jpg")
    output = tmp_path / "out"
    assert infer_det.main([checkpoints["detection"], str(images), "--output", str(output)]) == 2
    assert f"infer_det: error: {images / '000002.jpg'}: truncated JPEG" in capsys.readouterr().err
    assert sorted(p.name for p in output.iterdir()) == ["000001.jpg"]  # complete pictures only, no results.json
    assert not _leftovers(output)

    bad_json = tmp_path / "instances.json"
    bad_json.write_text('{"images": [')
    assert infer_det.main([checkpoints["detection"], str(images), "--annotations", str(bad_json)]) == 2
    assert f"{bad_json}: invalid JSON at line 1" in capsys.readouterr().err
    assert infer_det.main([checkpoints["detection"], str(tmp_path / "none"), "--output", str(output)]) == 2
    assert f"{tmp_path / 'none'}: no such image or folder" in capsys.readouterr().err


def test_infer_seg_bad_input_exits_2(checkpoints, evil, shapes, tmp_path, capsys):
    images = Path(shutil.copytree(shapes.val_images, tmp_path / "images"))
    cases = [
        ([evil, str(images)], f"refused to load '{evil}'"),
        ([_truncated(checkpoints["segmentation"], tmp_path / "cut.ckpt"), str(images)], "truncated or corrupt"),
        ([checkpoints["detection"], str(images)], "is a detection checkpoint, not a segmentation one"),
        ([checkpoints["segmentation"], str(images), "--size", "0"], "--size=0; give a positive shorter side"),
    ]
    for args, message in cases:
        assert _exit_status(infer_seg.main, [*args, "--output", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.splitlines()[-1].startswith("infer_seg: error: ") and message in err, err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())

    _corrupt_image(images / "000002.jpg")
    assert infer_seg.main([checkpoints["segmentation"], str(images), "--output", str(tmp_path / "out")]) == 2
    assert f"infer_seg: error: {images / '000002.jpg'}: cannot be decoded" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["000001_overlay.png"]  # complete ones only


TRAIN_CLS = "tools/train_cls.py (validate/test with --ckpt_path)"


@pytest.mark.parametrize(
    "tool, task, takes, other_tool",
    [
        ("infer_det", "segmentation", "detection", "tools/infer_seg.py"),
        ("infer_det", "classification", "detection", TRAIN_CLS),
        ("infer_seg", "detection", "segmentation", "tools/infer_det.py"),
        ("infer_seg", "classification", "segmentation", TRAIN_CLS),
    ],
)
def test_a_checkpoint_of_another_task_says_what_it_is_and_which_tool_takes_it(
    checkpoints, shapes, tmp_path, capsys, tool, task, takes, other_tool
):
    main = {"infer_det": infer_det, "infer_seg": infer_seg}[tool].main
    output = tmp_path / "out"
    assert main([checkpoints[task], str(shapes.val_images), "--output", str(output)]) == 2
    assert capsys.readouterr().err == (
        f"{tool}: error: '{checkpoints[task]}' is a {task} checkpoint, not a {takes} one (tools/{tool}.py takes a "
        f"{takes} checkpoint); give it to {other_tool}\n"
    )
    assert not output.exists() or not list(output.iterdir())


@pytest.mark.parametrize("tool", ["export_model", "export_backbone", "infer_det", "infer_seg"])
def test_a_checkpoint_of_a_model_no_task_builds_is_named(checkpoints, shapes, tmp_path, capsys, tool):
    loaded = torch.load(checkpoints["detection"], map_location="cpu", weights_only=True)
    loaded["hyper_parameters"]["model"] = "mask_rcnn_r19_fpn"
    path = tmp_path / "unknown.ckpt"
    torch.save(loaded, path)
    args = {"export_model": ["--format", "export"], "export_backbone": [str(tmp_path / "out.pth")]}
    args = args.get(tool, [str(shapes.val_images), "--output", str(tmp_path / "out")])
    assert _exit_status(load_tool(tool).main, [str(path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{tool}: error: '{path}': unknown model 'mask_rcnn_r19_fpn'; closest: mask_rcnn_r18_fpn")
    assert err.count("\n") == 1 and "(no task builds it)" in err
    assert not (tmp_path / "out.pth").exists() and not (tmp_path / "out").exists()


def _exit_status(main, argv: list[str]) -> int:
    """A tool's exit status: returned for bad input, raised by argparse for bad arguments."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def test_export_backbone_bad_checkpoints_exit_2_without_output(checkpoints, evil, tmp_path, capsys):
    cases = {
        evil: "refused to load",
        _truncated(checkpoints["classification"], tmp_path / "cut.ckpt"): "the file is truncated or corrupt",
        _with_backbone(checkpoints["detection"], "resnet34", tmp_path / "r34.ckpt"): (
            "the backbone weights do not fit create_backbone('resnet34', weights=...): exported weights do not fit"
        ),
    }
    for checkpoint, message in cases.items():
        output = tmp_path / "out" / "backbone.pth"
        assert export_backbone.main([checkpoint, str(output)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("export_backbone: error: ") and message in err, err
        assert not output.exists() and not _leftovers(tmp_path / "out")


def _with_backbone(checkpoint: str, backbone: str, path: Path) -> str:
    """A copy of a detection checkpoint whose hyper-parameters name another backbone than its weights'."""
    loaded = torch.load(checkpoint, map_location="cpu", weights_only=True)
    hparams = loaded["hyper_parameters"]
    hparams["model_options"] = {**(hparams["model_options"] or {}), "backbone": backbone}
    torch.save(loaded, path)
    return str(path)


def test_eval_det_bad_results_exit_2_without_output(shapes, tmp_path, capsys):
    results = tmp_path / "results.json"
    output = tmp_path / "metrics.json"
    box = {"image_id": 1, "bbox": [1, 1, 10, 10], "score": 0.9}
    for content, message in [
        ('[{"image_id": 1,', f"{results}: malformed JSON"),
        (json.dumps([{**box, "category_id": 2}]), "category_id 2, not among"),
        (json.dumps([{**box, "category_id": 1, "bbox": [1, 1, -5, 10]}]), "result 0 has bbox [1, 1, -5, 10], not a"),
    ]:
        results.write_text(content)
        args = ["--annotations", str(shapes.val_annotations), "--results", str(results), "--output", str(output)]
        assert eval_det.main(args) == 2
        assert message in capsys.readouterr().err
        assert not output.exists() and not _leftovers(tmp_path)


def test_model_info_unknown_name_exits_2(capsys):
    assert model_info.main(["resnet18", "resnet5"]) == 2
    assert "unknown backbone 'resnet5'; closest: resnet50" in capsys.readouterr().err


TRAIN_COMMON = ["--trainer.accelerator=cpu", "--trainer.logger=false", "--trainer.fast_dev_run=1",
                "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]  # fmt: skip


def _shapes_args(shapes, module: str) -> list[str]:
    return [f"--data={module}", f"--data.root={shapes.root}", "--data.num_train=2", "--data.num_val=2",
            "--data.image_size=48", "--data.seed=0", "--data.num_workers=0"]  # fmt: skip


def test_training_tools_raise_errors_that_name_the_culprit(shapes, coco, tmp_path, capsys):
    images, annotations = coco
    common = [*TRAIN_COMMON, f"--trainer.default_root_dir={tmp_path}"]
    detection_shapes = _shapes_args(shapes, "detection.data.ShapesDataModule")
    segmentation_shapes = _shapes_args(shapes, "segmentation.data.ShapesSegmentationDataModule")
    segmentation_shapes.append("--data.batch_size=2")
    annotations.write_text("{")
    misspelt = [  # one line on stderr, exit status 2
        (train_det.main, [*detection_shapes, "--model.model=faster_rcnn_r19_fpn"], "model 'faster_rcnn_r19_fpn'"),
        (train_det.main, [*detection_shapes, '--model.model_options={"backbone": "resnet5"}'], "'resnet5'; closest"),
        (train_seg.main, [*segmentation_shapes, "--model.backbone=resnet5"], "unknown backbone 'resnet5'"),
    ]  # fmt: skip
    for main, args, message in misspelt:
        with pytest.raises(SystemExit) as exit_:
            main(["fit", *args, *common])
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err
    cases = [
        (train_det.main, ["--data=detection.data.CocoDetectionDataModule", f"--data.train_images={images}",
                          f"--data.train_annotations={annotations}"], f"{annotations}: invalid JSON at line 1"),
        (train_det.main, ["--data=detection.data.CocoDetectionDataModule", f"--data.train_images={tmp_path / 'no'}",
                          f"--data.train_annotations={shapes.val_annotations}"], f"image folder {tmp_path / 'no'}"),
        (train_seg.main, [*segmentation_shapes, "--model.output_stride=12"], "output_stride=12; choose 8, 16 or 32"),
        (train_cls.main, [f"--data.root={tmp_path / 'no_images'}"], f"image folder {tmp_path / 'no_images'}/train"),
    ]  # fmt: skip
    for main, args, message in cases:
        with pytest.raises((ValueError, KeyError, FileNotFoundError)) as error:
            main(["fit", *args, *common])
        assert message in str(error.value)


@pytest.mark.parametrize(
    "tool, data, task, other_tool",
    [
        ("train_det", "detection.data.ShapesDataModule", "segmentation", "tools/train_seg.py"),
        ("train_seg", "segmentation.data.ShapesSegmentationDataModule", "classification", "tools/train_cls.py"),
        ("train_cls", "backbones.classification.ShapesClassificationDataModule", "detection", "tools/train_det.py"),
    ],
)
def test_training_tool_refuses_a_checkpoint_of_another_task(
    shapes, checkpoints, tmp_path, capsys, monkeypatch, tool, data, task, other_tool
):
    monkeypatch.setattr("sys.argv", [f"tools/{tool}.py"])  # the tool's name in the message, as from a shell
    args = ["validate", f"--data={data}", f"--trainer.default_root_dir={tmp_path}", f"--ckpt_path={checkpoints[task]}"]
    with pytest.raises(SystemExit) as exit_:
        {"train_det": train_det, "train_seg": train_seg, "train_cls": train_cls}[tool].main(args)
    assert exit_.value.code == 2
    takes = {"train_det": "detection", "train_seg": "segmentation", "train_cls": "classification"}[tool]
    assert capsys.readouterr().err == (
        f"{tool}: error: '{checkpoints[task]}' is a {task} checkpoint, not a {takes} one; give it to {other_tool}\n"
    )


# ------------------------------------------------------------------------------ as a shell would see it


def _run(tool: str, *args: str) -> subprocess.CompletedProcess:
    return run_tool(tool.removesuffix(".py"), *args)


@pytest.mark.slow  # two tools started as processes, one of them training
def test_tools_exit_non_zero_in_a_shell(shapes, evil, tmp_path):
    image = str(min(shapes.val_images.glob("*.jpg")))
    completed = _run("infer_det.py", evil, image, "--output", str(tmp_path / "out"))
    assert completed.returncode == 2 and "Traceback" not in completed.stderr
    assert completed.stderr.strip().splitlines()[-1].startswith(f"infer_det: error: refused to load '{evil}'")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())

    completed = _run("train_seg.py", "fit", *_shapes_args(shapes, "segmentation.data.ShapesSegmentationDataModule"),
                     *TRAIN_COMMON, f"--trainer.default_root_dir={tmp_path}", "--model.output_stride=12")  # fmt: skip
    assert completed.returncode != 0
    assert completed.stderr.strip().splitlines()[-1] == "ValueError: output_stride=12; choose 8, 16 or 32"
