"""Drawn detections: masks in a visible colour with an outline, labels kept inside the image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from detection.drawing import class_colours, label_position
from tests.tools.loader import load_tool

infer_det = load_tool("infer_det")


@pytest.fixture
def picture_and_colour():
    """A grey 64 x 96 image, one "star" box against the right edge whose mask fills its lower part."""
    image = torch.full((3, 64, 96), 90, dtype=torch.uint8)
    masks = torch.zeros(1, 64, 96, dtype=torch.bool)
    masks[0, 30:60, 64:92] = True
    prediction = {"boxes": torch.tensor([[60.0, 2.0, 96.0, 62.0]]), "labels": torch.tensor([1]),
                  "scores": torch.tensor([0.9]), "masks": masks}  # fmt: skip
    return infer_det.draw(image, prediction, ["__background__", "star"], 0.5), np.array(class_colours(2)[1])


def test_a_mask_is_a_bright_colour_blend_with_an_outline(picture_and_colour):
    picture, colour = picture_and_colour
    inside = picture[32:58, 66:90].reshape(-1, 3).astype(float)  # the mask, off its outline
    assert np.abs(inside - 90).sum(axis=1).min() > 60  # far from the grey it covers
    assert inside.max(axis=1).min() > 150  # bright, not a dark tint (the grey's brightest channel is 90)
    np.testing.assert_allclose(inside.mean(axis=0), (90 + colour) / 2, atol=1)  # half colour, half image
    assert (picture[30, 66:90] == colour).all() and (picture[45, 64] == colour).all()  # the outline


def test_a_label_at_the_right_edge_is_whole_inside_the_image(picture_and_colour):
    picture, colour = picture_and_colour
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left, top, right, bottom = draw.textbbox((0, 0), "star 0.90", font=ImageFont.load_default())
    width, height = right - left + 4, bottom - top + 4
    x, y = 96 - width, 2  # moved left to end at the right edge; inside the box, as there is no room above it
    assert (picture[y, x:96] == colour).all() and (picture[y : y + height, x] == colour).all()  # its whole margin
    assert (picture[y + height - 1, x:96] == colour).all()
    assert (picture[y + 2 : y + height - 2, x + 2 : 94] < 60).all(axis=-1).any()  # black text on it


@pytest.mark.parametrize(
    ("box", "image", "expected"),
    [
        ((10, 30, 40, 60), (100, 80), (10, 18)),  # above the box
        ((90, 30, 120, 60), (100, 80), (80, 18)),  # moved left from the right edge
        ((-5, 5, 20, 60), (100, 80), (0, 5)),  # no room above: inside the box
        ((0, 5, 9, 10), (100, 10), (0, 0)),  # an image lower than the label: from its top
    ],
)
def test_label_position_stays_inside(box, image, expected):
    assert label_position(box, (20, 12), image) == expected
