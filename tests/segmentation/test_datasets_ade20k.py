"""ADE20K SceneParsing as it ships: 150 classes, reduce_zero_label pixel by pixel, errors named."""

import shutil

import cv2
import numpy as np
import pytest

from segmentation.benchmark_datasets import ADE20KSegmentation
from segmentation.datasets import LabelFileError
from segmentation.label_tables import ADE20K_CLASSES, ADE20K_PALETTE, class_palette
from tests.segmentation.layouts import ADE_IMAGES, make_ade20k


@pytest.fixture(scope="module")
def ade(tmp_path_factory):
    root = tmp_path_factory.mktemp("ade")
    return root / "ADEChallengeData2016", make_ade20k(root)


def test_classes_and_palette():
    assert len(ADE20K_CLASSES) == len(set(ADE20K_CLASSES)) == len(ADE20K_PALETTE) == 150
    assert ADE20K_CLASSES[:3] == ("wall", "building", "sky") and ADE20K_CLASSES[7] == "bed"
    assert ADE20K_CLASSES[-1] == "flag" and ADE20K_PALETTE[0] == (120, 120, 120) and ADE20K_PALETTE[-1] == (92, 0, 255)
    assert class_palette(ADE20K_CLASSES).shape == (150, 3)


def test_reduce_zero_label_pixel_by_pixel(ade):
    root, written = ade
    for split, alias in (("training", "train"), ("validation", "val")):
        dataset = ADE20KSegmentation(root, alias)
        assert [image.stem for image, _ in dataset.pairs] == ADE_IMAGES[split]
        for index, (_, label) in enumerate(dataset.pairs):
            raw = written[str(label)]
            assert {0, 150} <= set(np.unique(raw).tolist())
            mask = dataset[index][1].numpy()
            np.testing.assert_array_equal(mask, np.where(raw == 0, 255, raw.astype(np.int64) - 1))
            assert mask.max(initial=0, where=mask != 255) == 149


def test_bad_files_are_named(ade, tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    shutil.copytree(ade[0], root)
    label = root / "annotations" / "validation" / "ADE_val_00000001.png"
    cv2.imwrite(str(label), np.full((64, 128), 151, np.uint8))
    with pytest.raises(LabelFileError, match=r"ADE_val_00000001\.png: label values \[151\] are outside ADE20K's"):
        ADE20KSegmentation(root, "validation")[0]
    label.unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 1 ADE20K images have no annotation.*ADE_val_00000001\.jpg"):
        ADE20KSegmentation(root, "validation")
    (root / "images" / "training" / "ADE_train_00000002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 ADE20K annotations have no image.*ADE_train_00000002\.png"):
        ADE20KSegmentation(root, "training")
    with pytest.raises(
        FileNotFoundError, match=r"no folder .*images/testing for split 'testing'.*training, validation"
    ):
        ADE20KSegmentation(root, "testing")
