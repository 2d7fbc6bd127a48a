"""Cityscapes as it ships: the official label table, label ids -> train ids, errors, label-id predictions."""

import shutil

import cv2
import numpy as np
import pytest
import torch

from segmentation.benchmark_data import CityscapesDataModule
from segmentation.benchmark_datasets import CityscapesSegmentation, train_ids_to_label_ids
from segmentation.datasets import LabelFileError
from segmentation.label_tables import CITYSCAPES_CLASSES, CITYSCAPES_LABELS, CITYSCAPES_PALETTE, class_palette
from segmentation.task import SegmentationTask
from tests.segmentation.layouts import CITYSCAPES_FRAMES, CITYSCAPES_WITH_TRAIN_IDS, make_cityscapes
from tests.tools.loader import fit_one_step, load_tool

# cityscapesScripts' labels.py, written out independently of the code: label id -> train id of the 19 classes;
# every other id of 0..33 is 255 and the license plate (-1) is -1.
TRAIN_ID_OF = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
               27: 14, 28: 15, 31: 16, 32: 17, 33: 18}  # fmt: skip
IGNORED_IDS = [0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30]


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("cityscapes")
    return root, make_cityscapes(root)


def expected_train_ids(label_ids):
    lookup = np.full(256, 255, np.uint8)
    for label_id, train_id in TRAIN_ID_OF.items():
        lookup[label_id] = train_id
    return lookup[label_ids]


def test_label_table_is_cityscapes_scripts_table():
    assert len(CITYSCAPES_LABELS) == 35
    assert [label.id for label in CITYSCAPES_LABELS] == [*range(34), -1]
    assert {label.id: label.train_id for label in CITYSCAPES_LABELS if label.train_id not in (255, -1)} == TRAIN_ID_OF
    assert sorted(label.id for label in CITYSCAPES_LABELS if label.train_id == 255) == IGNORED_IDS
    plate = CITYSCAPES_LABELS[-1]
    assert (plate.name, plate.train_id, plate.category, plate.ignore_in_eval) == ("license plate", -1, "vehicle", True)
    by_name = {label.name: label for label in CITYSCAPES_LABELS}
    assert by_name["road"].color == (128, 64, 128) and by_name["car"].color == (0, 0, 142)
    assert by_name["person"].category == "human" and by_name["person"].has_instances
    assert CITYSCAPES_CLASSES[:3] == ("road", "sidewalk", "building") and CITYSCAPES_CLASSES[-1] == "bicycle"
    assert len(CITYSCAPES_CLASSES) == 19 and CITYSCAPES_PALETTE[13] == (0, 0, 142)  # car
    assert class_palette(CITYSCAPES_CLASSES).tolist() == [list(c) for c in CITYSCAPES_PALETTE]
    # overlays colour a class by the dataset's own palette: road in (128, 64, 128)
    overlay = load_tool("infer_seg").overlay(
        np.zeros((1, 2, 3), np.uint8), np.array([[0, 13]]), CITYSCAPES_CLASSES, 1.0
    )
    assert overlay.tolist() == [[[128, 64, 128], [0, 0, 142]]]


def test_label_ids_become_train_ids_pixel_by_pixel(cityscapes):
    root, written = cityscapes
    dataset = CityscapesSegmentation(root, "val")
    assert [image.name for image, _ in dataset.pairs] == [f"{f}_leftImg8bit.png" for f in CITYSCAPES_FRAMES["val"]]
    for index, (_, label) in enumerate(dataset.pairs):
        raw = written[str(label)]
        assert set(np.unique(raw).tolist()) == set(range(34))  # the whole table is exercised
        image, mask = dataset[index]
        assert image.shape == (3, 64, 128)
        np.testing.assert_array_equal(mask.numpy(), expected_train_ids(raw))


def test_train_id_files_are_used_where_present(cityscapes):
    root, written = cityscapes
    dataset = CityscapesSegmentation(root, "train")
    labels = {image.name.removesuffix("_leftImg8bit.png"): label for image, label in dataset.pairs}
    assert labels[CITYSCAPES_WITH_TRAIN_IDS].name.endswith("_gtFine_labelTrainIds.png")
    assert labels["aachen_000000_000019"].name.endswith("_gtFine_labelIds.png")
    index = list(labels).index(CITYSCAPES_WITH_TRAIN_IDS)
    np.testing.assert_array_equal(dataset[index][1].numpy(), written[str(labels[CITYSCAPES_WITH_TRAIN_IDS])])
    only_ids = CityscapesSegmentation(root, "train", label_files="labelIds")
    raw = written[str(only_ids.pairs[index][1])]
    np.testing.assert_array_equal(only_ids[index][1].numpy(), expected_train_ids(raw))


def test_bad_files_are_named(cityscapes, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(cityscapes[0], root)
    label = root / "gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds.png"
    cv2.imwrite(str(label), np.full((64, 128), 34, np.uint8))
    with pytest.raises(LabelFileError, match=r"lindau_000000_000019_gtFine_labelIds\.png: label values \[34\]"):
        CityscapesSegmentation(root, "val")[1]
    label.unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 2 Cityscapes images have no label file.*lindau_000000_000019"):
        CityscapesSegmentation(root, "val")
    (root / "leftImg8bit/train/aachen/aachen_000001_000019_leftImg8bit.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 Cityscapes label files have no image.*aachen_000001_000019"):
        CityscapesSegmentation(root, "train")
    with pytest.raises(FileNotFoundError, match=r"no folder .*leftImg8bit/test for split 'test'.* has train, val"):
        CityscapesSegmentation(root, "test")


def test_train_ids_back_to_label_ids():
    np.testing.assert_array_equal(train_ids_to_label_ids(np.arange(19)), sorted(TRAIN_ID_OF))
    with pytest.raises(ValueError, match=r"train ids \[19, 255\]"):
        train_ids_to_label_ids(np.array([[0, 19], [255, 3]]))


def test_infer_seg_writes_label_ids_for_the_official_evaluation(cityscapes, tmp_path, monkeypatch, capsys):
    root, _ = cityscapes
    infer_seg = load_tool("infer_seg")
    datamodule = CityscapesDataModule(root=str(root), crop_size=(32, 64), batch_size=2, num_workers=0)
    options = {"aspp_channels": 16, "decoder_channels": 16}
    task = SegmentationTask(model="deeplabv3plus_r18", output_stride=32, model_options=options)
    checkpoint = fit_one_step(task, datamodule, tmp_path)
    source, output = root / "leftImg8bit" / "val", tmp_path / "results"
    command = [str(checkpoint), str(source), "--recursive", "--format", "cityscapes", "--output", str(output)]
    assert infer_seg.main([*command, "--no-fuse"]) == 0
    written = sorted(p.relative_to(output).as_posix() for p in output.rglob("*") if p.is_file())
    assert written == [f"{f.split('_')[0]}/{f}_leftImg8bit.png" for f in CITYSCAPES_FRAMES["val"]]  # nothing else
    image = source / "frankfurt" / "frankfurt_000000_000294_leftImg8bit.png"
    rgb = cv2.cvtColor(cv2.imread(str(image)), cv2.COLOR_BGR2RGB)
    train_ids = infer_seg.predict(task.eval(), [rgb], torch.device("cpu")).argmax(1)[0].numpy()  # the same weights
    label_ids = cv2.imread(str(output / "frankfurt" / image.name), cv2.IMREAD_UNCHANGED)
    lookup = {v: k for k, v in TRAIN_ID_OF.items()}
    assert label_ids.shape == (64, 128) and set(np.unique(label_ids)) <= set(TRAIN_ID_OF)
    np.testing.assert_array_equal(label_ids, np.vectorize(lookup.get)(train_ids))
    other = infer_seg.Segmenter(task, ["__background__", "thing"])
    monkeypatch.setattr(infer_seg, "load_model", lambda *args, **kwargs: other)
    assert infer_seg.main([*command[:-1], str(tmp_path / "no")]) == 2  # a model of other classes: named, status 2
    assert "needs a model of Cityscapes' 19 train-id classes" in capsys.readouterr().err
