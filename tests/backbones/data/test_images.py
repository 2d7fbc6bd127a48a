"""Images are read in the pixel space of their annotations: a JPEG's EXIF orientation is not applied."""

from __future__ import annotations

import json
import struct

import cv2
import numpy as np
import pytest

from backbones.data.images import read_rgb_image
from detection.coco import CocoDetection
from segmentation.datasets import CocoSegmentation, FolderSegmentation

HEIGHT, WIDTH = 24, 40
BOX = (4, 6, 16, 12)  # x, y, w, h of the bright rectangle in the stored pixels


def stored_pixels() -> np.ndarray:
    """RGB (24, 40, 3): dark, with a bright rectangle at `BOX` (not symmetric, so any rotation shows)."""
    image = np.full((HEIGHT, WIDTH, 3), 20, np.uint8)
    x, y, w, h = BOX
    image[y : y + h, x : x + w] = 230
    return image


def exif_orientation_segment(orientation: int) -> bytes:
    """An APP1 segment holding a big-endian TIFF header and one IFD entry: Orientation (0x0112), SHORT."""
    entry = struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0)
    tiff = b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 1) + entry + struct.pack(">I", 0)
    payload = b"Exif\x00\x00" + tiff
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


def write_tagged_jpeg(path, orientation: int) -> np.ndarray:
    """Writes the stored pixels as a JPEG tagged with `orientation`; returns what the file stores (RGB)."""
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(stored_pixels(), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    data = encoded.tobytes()
    path.write_bytes(data[:2] + exif_orientation_segment(orientation) + data[2:])  # right after start-of-image
    return cv2.cvtColor(cv2.imdecode(encoded, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_not_applied(tmp_path, orientation):
    path = tmp_path / "tagged.jpg"
    raw = write_tagged_jpeg(path, orientation)
    applied = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR)
    assert not np.array_equal(cv2.cvtColor(applied, cv2.COLOR_BGR2RGB), raw)  # OpenCV would rotate this file
    np.testing.assert_array_equal(read_rgb_image(path, HEIGHT, WIDTH), raw)


def write_coco(tmp_path, orientation: int):
    images = tmp_path / "images"
    images.mkdir()
    write_tagged_jpeg(images / "a.jpg", orientation)
    x, y, w, h = BOX
    polygon = [x, y, x + w, y, x + w, y + h, x, y + h]
    dataset = {
        "images": [{"id": 1, "file_name": "a.jpg", "height": HEIGHT, "width": WIDTH}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": list(BOX),
                "area": w * h,
                "iscrowd": 0,
                "segmentation": [polygon],
            }
        ],
        "categories": [{"id": 1, "name": "box"}],
    }
    annotations = tmp_path / "instances.json"
    annotations.write_text(json.dumps(dataset))
    return images, annotations


def bright(image) -> np.ndarray:
    """(H, W) bool: the pixels of the bright rectangle, from a (3, H, W) image tensor."""
    return image.numpy().mean(axis=0) > 128


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_detection_boxes_and_masks_stay_on_the_object(tmp_path, orientation):
    images, annotations = write_coco(tmp_path, orientation)
    image, target = CocoDetection(images, annotations, with_masks=True)[0]  # a 90 degree tag: no size error
    assert image.shape == (3, HEIGHT, WIDTH)
    x0, y0, x1, y1 = target["boxes"][0].int().tolist()
    inside = bright(image)[y0:y1, x0:x1]
    assert inside.mean() > 0.9 and bright(image).sum() == inside.sum()
    mask = target["masks"][0].numpy().astype(bool)
    assert (bright(image) & mask).sum() >= 0.9 * bright(image).sum()


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_segmentation_masks_stay_on_the_object(tmp_path, orientation):
    images, annotations = write_coco(tmp_path, orientation)
    image, mask = CocoSegmentation(images, annotations)[0]
    assert (bright(image) == (mask.numpy() == 1)).mean() > 0.97

    labels = tmp_path / "labels"
    labels.mkdir()
    x, y, w, h = BOX
    label = np.zeros((HEIGHT, WIDTH), np.uint8)
    label[y : y + h, x : x + w] = 1
    cv2.imwrite(str(labels / "a.png"), label)
    image, mask = FolderSegmentation(images, labels, num_classes=2)[0]
    np.testing.assert_array_equal(bright(image), mask.numpy() == 1)
