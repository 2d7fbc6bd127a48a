import contextlib
import io
import json
import re

import cv2
import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from torchvision import tv_tensors

from backbones.data.images import ImageFileError
from segmentation.data import (
    IGNORE_INDEX,
    CocoSegmentation,
    CocoSegmentationDataModule,
    FolderSegmentation,
    FolderSegmentationDataModule,
    LabelFileError,
    ShapesSegmentationDataModule,
    collate,
    read_label_mask,
)
from segmentation.transforms import RandomScale, train_transforms, val_transforms

# Non-contiguous, unsorted ids: with all categories, class k is the k-th id in id order.
CATEGORIES = [{"id": 7, "name": "triangle"}, {"id": 1, "name": "circle"}, {"id": 3, "name": "square"}]


def write_image(path, height, width, value=100):
    cv2.imwrite(str(path), np.full((height, width, 3), value, np.uint8))


def polygon(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


@pytest.fixture
def coco_files(tmp_path):
    """Image 1 (32x40): a square, a circle overlapping it, a triangle, a crowd circle region; image 2 empty."""
    images = tmp_path / "images"
    images.mkdir()
    write_image(images / "1.jpg", 32, 40)
    write_image(images / "2.jpg", 20, 20)
    crowd = np.zeros((32, 40), np.uint8)
    crowd[24:30, 30:38] = 1
    rle = mask_utils.encode(np.asfortranarray(crowd))
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 3, "segmentation": polygon(0, 0, 10, 10), "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "segmentation": polygon(5, 5, 15, 15), "iscrowd": 0},
        {"id": 3, "image_id": 1, "category_id": 3, "segmentation": polygon(8, 0, 12, 4), "iscrowd": 0},
        {"id": 4, "image_id": 1, "category_id": 7, "segmentation": polygon(20, 20, 28, 28), "iscrowd": 0},
        {"id": 5, "image_id": 1, "category_id": 1, "iscrowd": 1,
         "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}},
    ]  # fmt: skip
    for annotation in annotations:
        annotation["bbox"], annotation["area"] = [0, 0, 1, 1], 1
    coco = {
        "images": [{"id": 1, "file_name": "1.jpg", "height": 32, "width": 40},
                   {"id": 2, "file_name": "2.jpg", "height": 20, "width": 20}],
        "annotations": annotations,
        "categories": CATEGORIES,
    }  # fmt: skip
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    return images, path


def instance(coco, annotation_id):
    return coco.annToMask(coco.anns[annotation_id]).astype(bool)


def reference(coco_files):
    """pycocotools' reading of the fixture, the reference for the masks."""
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(coco_files[1]))


def test_coco_masks_classes_overlaps_and_crowd(coco_files):
    dataset, coco = CocoSegmentation(*coco_files), reference(coco_files)
    assert dataset.class_names == ["__background__", "circle", "square", "triangle"]
    mask = dataset.semantic_mask(1)
    square, circle, square2 = instance(coco, 1), instance(coco, 2), instance(coco, 3)
    assert (mask[square & circle] == IGNORE_INDEX).all()  # instances overlap: unknown
    assert (mask[square & square2] == IGNORE_INDEX).all()  # of the same class too (torchvision's reference)
    assert (mask[circle & ~square] == 1).all()
    assert (mask[instance(coco, 4)] == 3).all()
    assert (mask[instance(coco, 5)] == 1).all()  # a crowd region is its class
    assert mask[31, 0] == 0


def test_coco_category_subset_in_given_order(coco_files):
    dataset, coco = CocoSegmentation(*coco_files, category_ids=[7, 3]), reference(coco_files)
    assert dataset.num_classes == 3 and dataset.class_names == ["__background__", "triangle", "square"]
    mask = dataset.semantic_mask(1)
    circle = instance(coco, 2)
    assert (mask[instance(coco, 4)] == 1).all()
    assert (mask[circle & ~instance(coco, 1)] == 0).all()  # circles are not chosen: background
    assert (mask[instance(coco, 5)] == 0).all()  # nor is their crowd region ignored
    with pytest.raises(ValueError, match=r"unknown \[5\]"):
        CocoSegmentation(*coco_files, category_ids=[7, 5])


def test_coco_sample_types_and_skip_empty(coco_files):
    dataset = CocoSegmentation(*coco_files)
    image, mask = dataset[1]
    assert isinstance(image, tv_tensors.Image) and image.shape == (3, 20, 20) and image.dtype == torch.uint8
    assert isinstance(mask, tv_tensors.Mask) and mask.shape == (20, 20) and mask.sum() == 0
    assert len(dataset) == 2 and len(CocoSegmentation(*coco_files, skip_empty=True)) == 1


def test_coco_image_of_wrong_size_is_named(coco_files):
    images, _ = coco_files
    write_image(images / "2.jpg", 21, 20)
    with pytest.raises(ImageFileError, match=r"2\.jpg.*21x20.*20x20"):
        CocoSegmentation(*coco_files)[1]


@pytest.fixture
def folder(tmp_path):
    """Two images with masks in nested folders (classes 0..2, 255 void)."""
    for split_dir in ("images/a", "masks/a"):
        (tmp_path / split_dir).mkdir(parents=True)
    for stem in ("x", "y"):
        write_image(tmp_path / "images" / "a" / f"{stem}_img.jpg", 24, 30)
        mask = np.zeros((24, 30), np.uint8)
        mask[5:15, 5:15] = 2
        mask[0, :] = IGNORE_INDEX
        cv2.imwrite(str(tmp_path / "masks" / "a" / f"{stem}_lbl.png"), mask)
    return tmp_path / "images", tmp_path / "masks"


def folder_dataset(folder, **kwargs):
    return FolderSegmentation(*folder, num_classes=3, image_suffix="_img", mask_suffix="_lbl", **kwargs)


def test_folder_pairs_by_stem_with_suffixes(folder):
    dataset = folder_dataset(folder)
    assert [(i.name, m.name) for i, m in dataset.pairs] == [("x_img.jpg", "x_lbl.png"), ("y_img.jpg", "y_lbl.png")]
    image, mask = dataset[0]
    assert image.shape == (3, 24, 30) and mask.shape == (24, 30)
    assert set(mask.unique().tolist()) == {0, 2, IGNORE_INDEX}


def test_folder_missing_mask_is_named(folder):
    (folder[1] / "a" / "y_lbl.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 2 images have no mask.*y_img\.jpg -> .*y_lbl\.png"):
        folder_dataset(folder)


def test_folder_mask_of_other_size_is_named(folder):
    cv2.imwrite(str(folder[1] / "a" / "y_lbl.png"), np.zeros((24, 31), np.uint8))
    with pytest.raises(LabelFileError, match=r"y_lbl\.png: size 24x31.*y_img\.jpg, 24x30"):
        folder_dataset(folder)[1]


def test_folder_labels_outside_the_classes_are_named(folder):
    mask = np.zeros((24, 30), np.uint8)
    mask[0, 0], mask[0, 1] = 3, 9
    cv2.imwrite(str(folder[1] / "a" / "x_lbl.png"), mask)
    with pytest.raises(LabelFileError, match=r"x_lbl\.png: label values \[3, 9\] are outside the classes 0\.\.2"):
        folder_dataset(folder)[0]


def test_palette_png_gives_indices_and_colour_png_is_refused(tmp_path):
    indices = np.array([[0, 1], [2, 255]], np.uint8)
    picture = Image.fromarray(indices, mode="P")
    picture.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (3 * 252) + [224, 224, 192])
    picture.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(read_label_mask(tmp_path / "palette.png"), indices)
    cv2.imwrite(str(tmp_path / "colour.png"), np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(LabelFileError, match=re.escape("colour.png: a RGB colour image")):
        read_label_mask(tmp_path / "colour.png")


def sample(height=40, width=60):
    image = tv_tensors.Image(torch.randint(1, 255, (3, height, width), dtype=torch.uint8))
    mask = tv_tensors.Mask((torch.arange(width) // 20).repeat(height, 1).to(torch.uint8))  # 0, 1, 2 stripes
    return image, mask


def test_train_transforms_crop_pad_and_keep_labels():
    torch.manual_seed(0)
    transform = train_transforms(64, scale_range=(0.5, 2.0))
    for _ in range(10):
        image, mask = transform(*sample())
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and mask.shape == (64, 64)
        assert set(mask.unique().tolist()) <= {0, 1, 2, IGNORE_INDEX}  # nearest: no blended labels
        padding = mask == IGNORE_INDEX
        assert (image[:, padding] == 0).all()  # pad: image 0 where the mask is void
        assert (image[:, ~padding] > 0).all()


def test_random_scale_resizes_image_and_mask_together():
    torch.manual_seed(0)
    image, mask = RandomScale((2.0, 2.0))(*sample(10, 30))
    assert image.shape == (3, 20, 60) and mask.shape == (20, 60)
    assert mask[:, :40].max() == 0 and mask[:, 40:80].min() == 1
    image, mask = RandomScale((1.0, 1.0), base_size=20)(*sample(10, 30))
    assert mask.shape == (20, 60)
    image, _ = sample(10, 30)
    _, other_mask = sample(12, 30)
    with pytest.raises(ValueError, match=r"one image size .* found \[\(10, 30\), \(12, 30\)\]"):
        RandomScale((1.0, 1.0))(image, other_mask)


def test_val_transforms_keep_or_resize_whole_image():
    image, mask = val_transforms()(*sample())
    assert image.shape == (3, 40, 60) and mask.shape == (40, 60) and image.max() <= 1
    image, mask = val_transforms(20)(*sample())
    assert image.shape == (3, 20, 30) and mask.shape == (20, 30)
    assert set(mask.unique().tolist()) <= {0, 1, 2}


def test_collate_pads_with_zero_and_ignore():
    images, masks = collate([(torch.ones(3, 4, 5), torch.zeros(4, 5, dtype=torch.uint8)),
                             (torch.ones(3, 6, 3), torch.ones(6, 3, dtype=torch.uint8))])  # fmt: skip
    assert images.shape == (2, 3, 6, 5) and masks.shape == (2, 6, 5) and masks.dtype == torch.int64
    assert images[0, :, 4:].sum() == 0 and (masks[0, 4:] == IGNORE_INDEX).all()
    assert (masks[1, :, 3:] == IGNORE_INDEX).all() and (masks[1, :, :3] == 1).all()


def test_coco_datamodule_classes_before_setup_and_loaders(coco_files):
    images, annotations = coco_files
    datamodule = CocoSegmentationDataModule(
        train_images=str(images), train_annotations=str(annotations), val_images=str(images),
        val_annotations=str(annotations), category_ids=[1, 3], batch_size=1, num_workers=0, crop_size=16,
    )  # fmt: skip
    assert datamodule.num_classes == 3 and datamodule.class_names[1:] == ["circle", "square"]
    datamodule.setup("fit")
    assert len(datamodule.dataset("train")) == 1  # the empty image is skipped in training
    images_batch, masks = next(iter(datamodule.train_dataloader()))
    assert images_batch.shape == (1, 3, 16, 16) and masks.shape == (1, 16, 16)
    assert len(datamodule.val_dataloader()) == 2
    with pytest.raises(ValueError, match="no test data given"):
        datamodule.setup("test")


def test_folder_datamodule_checks_class_names(folder):
    with pytest.raises(ValueError, match="2 names for num_classes=3"):
        FolderSegmentationDataModule(num_classes=3, class_names=["a", "b"])
    datamodule = FolderSegmentationDataModule(
        num_classes=3, val_images=str(folder[0]), val_masks=str(folder[1]), image_suffix="_img", mask_suffix="_lbl",
        val_batch_size=2, num_workers=0,
    )  # fmt: skip
    datamodule.setup("validate")
    images, _masks = next(iter(datamodule.val_dataloader()))
    assert images.shape == (2, 3, 24, 30) and datamodule.class_names == ["class0", "class1", "class2"]


def test_shapes_datamodule_generates_on_first_use(tmp_path):
    datamodule = ShapesSegmentationDataModule(
        root=str(tmp_path / "shapes"), num_train=4, num_val=2, image_size=48, batch_size=2, num_workers=0
    )
    assert datamodule.num_classes == 4 and datamodule.class_names == ["__background__", "circle", "square", "triangle"]
    datamodule.prepare_data()
    datamodule.setup("fit")
    images, masks = next(iter(datamodule.train_dataloader()))
    assert images.shape == (2, 3, 48, 48) and masks.shape == (2, 48, 48)
    assert set(masks.unique().tolist()) <= {0, 1, 2, 3, IGNORE_INDEX}
    assert len(datamodule.dataset("val")) == 2
