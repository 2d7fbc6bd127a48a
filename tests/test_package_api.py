"""Each package exports its public API with the same shape; the models import neither Lightning nor OpenCV."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import backbones
import detection
import segmentation

API = {
    "backbones": ["create_backbone", "create_model", "list_backbones", "ClassificationTask", "ImageFolderDataModule"],
    "detection": ["build_model", "PRESETS", "COCOEvaluator", "DetectionTask", "CocoDetectionDataModule"],
    "segmentation": [
        "build_model",
        "PRESETS",
        "SegmentationEvaluator",
        "SegmentationTask",
        "CocoSegmentationDataModule",
    ],
}


@pytest.mark.parametrize("package", sorted(API))
def test_package_exports_its_api(package):
    module = {"backbones": backbones, "detection": detection, "segmentation": segmentation}[package]
    for name in API[package]:
        assert name in module.__all__, name
        assert getattr(module, name) is not None
        assert name in dir(module)
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        _ = module.NoSuchThing


def test_importing_the_models_loads_neither_lightning_nor_opencv():
    code = (
        "import sys, backbones, detection, segmentation\n"
        "segmentation.build_model('deeplabv3_r18', num_classes=3)\n"
        "print(sorted(m for m in ('lightning', 'cv2') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_license_file_is_the_one_pyproject_declares():
    root = Path(__file__).resolve().parents[1]
    declared = tomllib.loads((root / "pyproject.toml").read_text())["project"]["license"]["text"]
    assert declared == "Apache-2.0"
    text = (root / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
