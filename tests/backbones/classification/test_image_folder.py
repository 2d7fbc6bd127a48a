"""ImageFolder keeps its (path, label) entries in arrays, in torchvision's order."""

import pickle

import cv2
import numpy as np
import torchvision

from backbones.classification.data import ImageFolder


def test_entries_are_arrays_in_torchvision_order(tmp_path):
    for name, count in (("b_dogs", 3), ("a_cats", 2), ("c_ünïcode", 2)):
        (tmp_path / name).mkdir()
        for i in range(count):
            cv2.imwrite(str(tmp_path / name / f"{count - i}.png"), np.full((8, 10, 3), i * 40, np.uint8))
    dataset = ImageFolder(tmp_path, ["a_cats", "b_dogs", "c_ünïcode"])
    reference = torchvision.datasets.ImageFolder(str(tmp_path))
    assert dataset.samples == reference.samples
    assert isinstance(dataset.targets, np.ndarray) and dataset.targets.dtype == np.int32
    lists = [value for value in vars(dataset).values() if isinstance(value, (list, tuple, dict))]
    assert lists == [dataset.class_names]  # no Python object per image
    image, label = pickle.loads(pickle.dumps(dataset))[4]
    assert label == 1 and image.shape == (3, 8, 10)
