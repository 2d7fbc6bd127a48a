"""Pascal VOC 2012 as it ships: split lists, palette labels read as indices with 255 borders, SBD's aug set."""

import shutil

import cv2
import numpy as np
import pytest

from segmentation.benchmark_data import VOCDataModule
from segmentation.benchmark_datasets import VOCSegmentation
from segmentation.datasets import LabelFileError
from segmentation.label_tables import VOC_CLASSES, VOC_PALETTE, class_palette
from tests.segmentation.layouts import VOC_SPLITS, VOC_UNLISTED, make_voc


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    devkit = tmp_path_factory.mktemp("voc") / "VOCdevkit"
    return devkit / "VOC2012", make_voc(devkit)


def names(dataset):
    return [(image.stem, label.parent.name) for image, label in dataset.pairs]


def test_classes_and_palette():
    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[1] == "aeroplane" and VOC_CLASSES[-1] == "tvmonitor"
    assert VOC_PALETTE[:4] == ((0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0)) and VOC_PALETTE[15] == (
        192,
        128,
        128,
    )
    assert class_palette(VOC_CLASSES).tolist() == [list(c) for c in VOC_PALETTE]


def test_split_lists_choose_the_images_in_their_order(voc):
    root, _ = voc
    for split in ("train", "val"):
        assert names(VOCSegmentation(root, split)) == [(i, "SegmentationClass") for i in VOC_SPLITS[split]]
    trainval = [image.stem for image, _ in VOCSegmentation(root.parent, "trainval").pairs]  # VOCdevkit works too
    assert trainval == VOC_SPLITS["train"] + VOC_SPLITS["val"] and VOC_UNLISTED not in trainval
    # train_aug: VOC's own labels for VOC's images, SBD's for the rest; as the list or as train + aug
    expected = [(i, "SegmentationClass") for i in VOC_SPLITS["train"]]
    expected += [(i, "SegmentationClassAug") for i in VOC_SPLITS["aug"]]
    assert names(VOCSegmentation(root, "train_aug")) == expected
    assert names(VOCSegmentation(root, ["train", "aug"])) == expected
    datamodule = VOCDataModule(root=str(root), train_split=["train", "aug"], batch_size=2, num_workers=0)
    assert names(datamodule.dataset("train")) == expected and datamodule.class_names == list(VOC_CLASSES)


def test_palette_labels_are_indices_with_255_borders_pixel_by_pixel(voc):
    root, written = voc
    dataset = VOCSegmentation(root, ["val", "aug"])
    for index, (_, label) in enumerate(dataset.pairs):
        raw = written[str(label)]
        image, mask = dataset[index]
        assert image.shape == (3, 64, 128)
        np.testing.assert_array_equal(mask.numpy(), raw)
    val_mask = dataset[0][1].numpy()
    assert (val_mask[::8, :] == 255).all() and (val_mask[:, ::8] == 255).all()  # the borders stay ignored
    assert set(np.unique(val_mask[1:8, 1:8]).tolist()) <= set(range(21))


def test_bad_lists_and_files_are_named(voc, tmp_path):
    root = tmp_path / "VOC2012"
    shutil.copytree(voc[0], root)
    lists = root / "ImageSets" / "Segmentation"
    with pytest.raises(
        FileNotFoundError, match=r"no list .*trainaug\.txt for split 'trainaug'; the lists there: aug, "
    ):
        VOCSegmentation(root, "trainaug")
    (lists / "train_aug.txt").rename(lists / "trainaug.txt")  # MMSegmentation's name for the same list
    assert len(VOCSegmentation(root, "train_aug")) == len(VOC_SPLITS["train"]) + len(VOC_SPLITS["aug"])
    with pytest.raises(ValueError, match=r"2007_000032 is listed twice: in .*train\.txt and .*trainval\.txt"):
        VOCSegmentation(root, ["train", "trainval"])
    (lists / "val.txt").write_text("2007_000033\n2007_999999\n")
    with pytest.raises(FileNotFoundError, match=r"1 of 2 images listed in \['val'\] are missing.*2007_999999\.jpg"):
        VOCSegmentation(root, "val")
    (lists / "val.txt").write_text(f"2007_000033\n{VOC_UNLISTED}\n")
    with pytest.raises(FileNotFoundError, match=rf"1 of 2 images listed .* have no label file.*{VOC_UNLISTED}\.jpg"):
        VOCSegmentation(root, "val")
    label = root / "SegmentationClassAug" / "2008_000002.png"
    raw = np.full((64, 128), 21, np.uint8)
    cv2.imwrite(str(label), raw)
    with pytest.raises(LabelFileError, match=r"2008_000002\.png: label values \[21\] are outside the classes 0\.\.20"):
        VOCSegmentation(root, "aug")[0]
