import json
import logging
import re

import cv2
import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from torch.utils.data import DistributedSampler, SequentialSampler
from torchvision import tv_tensors
from torchvision.transforms import v2

from detection.data import (
    AnnotationFileError,
    CocoDetection,
    CocoDetectionDataModule,
    GroupedBatchSampler,
    ImageFileError,
    ShapesDataModule,
    collate,
)
from detection.transforms import train_transforms, val_transforms

# Category ids out of order and non-contiguous: labels 1, 2, 3 are ids 1, 3, 7.
CATEGORIES = [{"id": 3, "name": "square"}, {"id": 1, "name": "circle"}, {"id": 7, "name": "triangle"}]


def rle_of(mask):
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def make_rle_mask(height, width):
    mask = np.zeros((height, width), np.uint8)
    mask[4:12, 30:44] = 1
    return mask


@pytest.fixture
def coco_files(tmp_path):
    """Three PNG images (landscape, portrait, empty) and their COCO JSON."""
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    sizes = {1: (32, 48), 2: (48, 32), 3: (32, 32)}  # image_id: (height, width)
    for image_id, (height, width) in sizes.items():
        image = np.zeros((height, width, 3), np.uint8)
        image[..., 2] = 200  # red in BGR
        cv2.imwrite(str(images_dir / f"{image_id}.png"), image)
    crowd = np.zeros((32, 48), np.uint8)
    crowd[20:30, 2:10] = 1
    annotations = [
        {
            "id": 10,
            "image_id": 1,
            "category_id": 3,
            "bbox": [2, 2, 10, 10],
            "area": 100,
            "iscrowd": 0,
            "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]],
        },
        {
            "id": 11,
            "image_id": 1,
            "category_id": 7,
            "bbox": [30, 4, 14, 8],
            "area": 112,
            "iscrowd": 0,
            "segmentation": rle_of(make_rle_mask(32, 48)),
        },
        {
            "id": 12,
            "image_id": 1,
            "category_id": 1,
            "bbox": [2, 20, 8, 10],
            "area": 80,
            "iscrowd": 1,
            "segmentation": {"size": [32, 48], "counts": uncompressed_counts(crowd)},
        },
        {
            "id": 13,
            "image_id": 1,
            "category_id": 1,
            "bbox": [20, 20, 0, 5],
            "area": 0,
            "iscrowd": 0,
            "segmentation": [[20, 20, 20, 25, 20, 20]],
        },
        {
            "id": 20,
            "image_id": 2,
            "category_id": 1,
            "bbox": [4, 30, 20, 10],
            "area": 200,
            "iscrowd": 0,
            "segmentation": [[4, 30, 24, 30, 24, 40, 4, 40]],
        },
    ]
    coco = {
        "images": [{"id": i, "file_name": f"{i}.png", "height": h, "width": w} for i, (h, w) in sizes.items()],
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    annotations_path = tmp_path / "instances.json"
    annotations_path.write_text(json.dumps(coco, indent=1))
    return images_dir, annotations_path


def uncompressed_counts(mask):
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with zeros."""
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    return counts if flat[0] == 0 else [0, *counts]


def rewrite_json(path, edit):
    coco = json.loads(path.read_text())
    edit(coco)
    path.write_text(json.dumps(coco))


def test_label_mapping_round_trip(coco_files):
    dataset = CocoDetection(*coco_files)
    assert dataset.label_to_category_id == {1: 1, 2: 3, 3: 7}
    assert dataset.class_names == ["__background__", "circle", "square", "triangle"]
    assert dataset.num_classes == 4
    _, target = dataset[0]
    assert [dataset.label_to_category_id[int(label)] for label in target["labels"]] == [3, 7]


def test_sample_types_and_fields(coco_files):
    image, target = CocoDetection(*coco_files)[0]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8 and image.shape == (3, 32, 48)
    assert image[0].float().mean() > 150 and image[2].float().mean() < 50  # decoded as RGB
    assert isinstance(target["boxes"], tv_tensors.BoundingBoxes)
    assert target["boxes"].format == tv_tensors.BoundingBoxFormat.XYXY and target["boxes"].canvas_size == (32, 48)
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    torch.testing.assert_close(target["boxes"][0], torch.tensor([2.0, 2.0, 12.0, 12.0]))
    assert target["image_id"] == 1 and target["orig_size"].tolist() == [32, 48]
    assert "masks" not in target


def test_crowd_excluded_and_zero_size_box_dropped(coco_files, caplog):
    with caplog.at_level(logging.INFO, logger="detection.coco"):
        dataset = CocoDetection(*coco_files)
    _, target = dataset[0]
    assert len(target["boxes"]) == 2  # 4 annotations minus one crowd, one zero-width box
    assert dataset.num_dropped_boxes == 1
    messages = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(messages) == 1 and "dropped 1 box" in messages[0]


def test_image_without_annotations_is_kept(coco_files):
    dataset = CocoDetection(*coco_files, with_masks=True)
    assert len(dataset) == 3
    image, target = dataset[2]
    assert image.shape == (3, 32, 32)
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["masks"].shape == (0, 32, 32)


def test_polygon_and_rle_masks_are_decoded(coco_files):
    _, target = CocoDetection(*coco_files, with_masks=True)[0]
    masks = target["masks"]
    assert isinstance(masks, tv_tensors.Mask) and masks.dtype == torch.uint8 and masks.shape == (2, 32, 48)
    polygon_mask = masks[0].bool()
    assert polygon_mask[3:12, 3:12].all() and polygon_mask.sum() <= 11 * 11
    assert torch.equal(masks[1], torch.from_numpy(make_rle_mask(32, 48)))


def test_horizontal_flip_moves_boxes_and_masks(coco_files):
    plain = CocoDetection(*coco_files, with_masks=True)
    flipped = CocoDetection(*coco_files, transforms=v2.RandomHorizontalFlip(p=1.0), with_masks=True)
    (image, target), (flipped_image, flipped_target) = plain[0], flipped[0]
    width = image.shape[-1]
    torch.testing.assert_close(flipped_image, image.flip(-1))
    torch.testing.assert_close(flipped_target["masks"], target["masks"].flip(-1))
    expected = target["boxes"][:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + torch.tensor([width, 0, width, 0])
    torch.testing.assert_close(flipped_target["boxes"].as_subclass(torch.Tensor), expected.as_subclass(torch.Tensor))
    for box, mask in zip(flipped_target["boxes"], flipped_target["masks"], strict=True):
        columns = mask.any(0).nonzero()
        assert box[0] <= columns.min() and columns.max() < box[2]


def test_train_transforms_resize_all_targets_together(coco_files):
    dataset = CocoDetection(*coco_files, transforms=train_transforms((16,), 64), with_masks=True)
    image, target = dataset[0]
    assert image.dtype == torch.float32 and image.min() >= 0 and image.max() <= 1
    assert image.shape == (3, 16, 24)
    assert target["masks"].shape == (2, 16, 24) and target["masks"].dtype == torch.uint8
    assert target["boxes"].canvas_size == (16, 24)
    assert len(target["labels"]) == len(target["boxes"]) == 2
    assert (target["boxes"][:, 2:] <= torch.tensor([24, 16])).all()
    assert target["orig_size"].tolist() == [32, 48]


def test_val_transforms_keep_size(coco_files):
    image, target = CocoDetection(*coco_files, transforms=val_transforms())[0]
    assert image.dtype == torch.float32 and image.shape == (3, 32, 48)
    torch.testing.assert_close(target["boxes"][0].as_subclass(torch.Tensor), torch.tensor([2.0, 2.0, 12.0, 12.0]))


def test_train_transforms_reject_bad_sizes():
    with pytest.raises(ValueError, match="train_sizes"):
        train_transforms((), 100)
    with pytest.raises(ValueError, match="max_size=100"):
        train_transforms((200,), 100)


def test_missing_image_is_named(coco_files):
    images_dir, annotations = coco_files
    (images_dir / "2.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 3 images .* e\.g\. 2\.png"):
        CocoDetection(images_dir, annotations)


def test_truncated_jpeg_is_named(coco_files):
    images_dir, annotations = coco_files
    image = np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8)
    cv2.imwrite(str(images_dir / "1.jpg"), image)
    data = (images_dir / "1.jpg").read_bytes()
    (images_dir / "1.jpg").write_bytes(data[: len(data) // 2])
    rewrite_json(annotations, lambda coco: coco["images"][0].update(file_name="1.jpg"))
    dataset = CocoDetection(images_dir, annotations)
    with pytest.raises(ImageFileError, match=r"1\.jpg.*truncated"):
        dataset[0]


def test_unreadable_image_is_named(coco_files):
    images_dir, annotations = coco_files
    (images_dir / "2.png").write_bytes(b"not an image")
    with pytest.raises(ImageFileError, match=r"2\.png.*cannot be decoded"):
        CocoDetection(images_dir, annotations)[1]


def test_image_of_wrong_size_is_named(coco_files):
    images_dir, annotations = coco_files
    cv2.imwrite(str(images_dir / "3.png"), np.zeros((10, 20, 3), np.uint8))
    with pytest.raises(ImageFileError, match=r"3\.png: decoded size 10x20"):
        CocoDetection(images_dir, annotations)[2]


def test_malformed_json_is_named(coco_files):
    images_dir, annotations = coco_files
    text = annotations.read_text().splitlines()
    text[2] = text[2] + ","  # a stray comma on line 3
    annotations.write_text("\n".join(text))
    with pytest.raises(AnnotationFileError, match=r"instances\.json: invalid JSON at line \d+, column \d+"):
        CocoDetection(images_dir, annotations)


def test_missing_top_level_key_is_named(coco_files):
    images_dir, annotations = coco_files
    rewrite_json(annotations, lambda coco: coco.pop("categories"))
    with pytest.raises(AnnotationFileError, match=re.escape("instances.json: missing the top-level key 'categories'")):
        CocoDetection(images_dir, annotations)


def test_unknown_category_is_named(coco_files):
    images_dir, annotations = coco_files
    rewrite_json(annotations, lambda coco: coco["annotations"][4].update(category_id=5))
    with pytest.raises(AnnotationFileError, match=r"annotation id 20 has category_id 5.*allowed ids: \[1, 3, 7\]"):
        CocoDetection(images_dir, annotations)


def test_collate_keeps_lists(coco_files):
    dataset = CocoDetection(*coco_files)
    images, targets = collate([dataset[0], dataset[1]])
    assert [i.shape for i in images] == [(3, 32, 48), (3, 48, 32)]
    assert [t["image_id"] for t in targets] == [1, 2]


@pytest.mark.parametrize("batch_size", [1, 3, 4])
def test_grouped_batch_sampler_yields_every_index_once(batch_size):
    group_ids = torch.randint(0, 2, (23,), generator=torch.Generator().manual_seed(0)).tolist()
    sampler = GroupedBatchSampler(SequentialSampler(range(23)), group_ids, batch_size)
    batches = list(sampler)
    assert sorted(i for batch in batches for i in batch) == list(range(23))
    assert len(batches) == len(sampler)
    assert all(len(batch) <= batch_size for batch in batches)
    mixed = [batch for batch in batches if len({group_ids[i] for i in batch}) > 1]
    assert mixed == batches[len(batches) - len(mixed) :] and len(mixed) <= 2  # only the leftovers mix


def test_grouped_batch_sampler_is_deterministic_per_epoch_and_splits_ranks():
    group_ids = [i % 3 == 0 for i in range(21)]

    def batches(rank, epoch):
        sampler = DistributedSampler(range(21), num_replicas=2, rank=rank, shuffle=True, seed=1)
        grouped = GroupedBatchSampler(sampler, group_ids, 4)
        grouped.set_epoch(epoch)
        return list(grouped)

    assert batches(0, 0) == batches(0, 0)
    assert batches(0, 0) != batches(0, 1)
    rank0, rank1 = batches(0, 0), batches(1, 0)
    assert len(rank0) == len(rank1)  # DDP ranks must run the same number of steps
    seen = {i for batch in rank0 + rank1 for i in batch}
    assert seen == set(range(21))


def test_datamodule_num_classes_before_setup(coco_files):
    images_dir, annotations = coco_files
    datamodule = CocoDetectionDataModule(val_images=str(images_dir), val_annotations=str(annotations))
    assert datamodule.num_classes == 4
    assert datamodule.label_to_category_id == {1: 1, 2: 3, 3: 7}
    assert datamodule.class_names[0] == "__background__"
    assert datamodule.val_annotations == str(annotations)
    assert datamodule.datasets == {}


def test_datamodule_loaders(coco_files):
    images_dir, annotations = coco_files
    paths = {"images": str(images_dir), "annotations": str(annotations)}
    datamodule = CocoDetectionDataModule(
        **{f"{split}_{kind}": path for split in ("train", "val") for kind, path in paths.items()},
        batch_size=2,
        num_workers=0,
        train_sizes=(16,),
        max_size=32,
    )
    datamodule.setup("fit")
    train = list(datamodule.train_dataloader())
    assert sorted(t["image_id"] for _, targets in train for t in targets) == [1, 2, 3]
    val = list(datamodule.val_dataloader())
    assert [targets[0]["image_id"] for _, targets in val] == [1, 2, 3]  # sequential, one image per batch
    assert val[0][0][0].shape == (3, 32, 48)  # not resized


def test_datamodule_uses_persistent_workers(coco_files):
    images_dir, annotations = coco_files
    datamodule = CocoDetectionDataModule(val_images=str(images_dir), val_annotations=str(annotations), num_workers=2)
    loader = datamodule.val_dataloader()
    assert loader.persistent_workers and loader.num_workers == 2


def test_datamodule_rejects_different_categories(coco_files, tmp_path):
    images_dir, annotations = coco_files
    other = tmp_path / "other.json"
    other.write_text(annotations.read_text())
    rewrite_json(other, lambda coco: coco["categories"].append({"id": 9, "name": "star"}))
    datamodule = CocoDetectionDataModule(
        train_images=str(images_dir),
        train_annotations=str(other),
        val_images=str(images_dir),
        val_annotations=str(annotations),
    )
    with pytest.raises(AnnotationFileError, match=re.escape("other.json: categories")):
        datamodule.setup("fit")


def test_datamodule_names_missing_split_paths(coco_files):
    images_dir, annotations = coco_files
    datamodule = CocoDetectionDataModule(val_images=str(images_dir), val_annotations=str(annotations))
    with pytest.raises(ValueError, match="train_images=None"):
        datamodule.train_dataloader()


def test_shapes_datamodule_end_to_end(tmp_path):
    datamodule = ShapesDataModule(
        root=str(tmp_path / "shapes"), num_train=8, num_val=2, image_size=64, num_workers=0, with_masks=True
    )
    assert datamodule.num_classes == 4  # known before any file exists
    assert datamodule.label_to_category_id == {1: 1, 2: 3, 3: 7}
    datamodule.prepare_data()
    datamodule.prepare_data()  # cached: a second call (another rank) is harmless
    datamodule.setup("fit")
    train = datamodule.train_dataloader()
    assert len(train) == 4
    images, targets = next(iter(train))
    assert len(images) == 2 and images[0].shape == (3, 64, 64) and images[0].dtype == torch.float32
    for target in targets:
        assert target["masks"].shape[0] == len(target["boxes"]) == len(target["labels"]) > 0
        assert set(target["labels"].tolist()) <= {1, 2, 3}
    images, targets = next(iter(datamodule.val_dataloader()))
    assert len(images) == 1 and images[0].shape == (3, 64, 64)
    datamodule.setup("test")
    assert len(datamodule.test_dataloader()) == 2


def test_datamodule_reads_each_annotation_file_once(coco_files, tmp_path, monkeypatch):
    import backbones.data.coco as coco_store

    monkeypatch.setenv("RESBONE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(coco_store, "_OPEN", {})
    parses = []
    build = coco_store.build_arrays
    monkeypatch.setattr(coco_store, "build_arrays", lambda path: parses.append(path) or build(path))
    images_dir, annotations = coco_files
    datamodule = CocoDetectionDataModule(
        train_images=str(images_dir), train_annotations=str(annotations),
        val_images=str(images_dir), val_annotations=str(annotations), num_workers=0,
    )  # fmt: skip
    datamodule.prepare_data()  # Lightning: once per node, before any process reads
    assert datamodule.num_classes == 4 and datamodule.class_names[1] == "circle"
    datamodule.setup("fit")
    assert parses == [annotations]  # categories, both splits and the cross-check share one store
    assert datamodule.datasets["train"].store is datamodule.datasets["val"].store
    monkeypatch.setattr(coco_store, "_OPEN", {})  # another process of the node maps the cache
    assert CocoDetection(images_dir, annotations).label_to_category_id == {1: 1, 2: 3, 3: 7}
    assert parses == [annotations]
