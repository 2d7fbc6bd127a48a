"""Pictures of detections: masks as a bright per-class colour blended in and outlined, boxes, and labels
that stay inside the image.

torchvision's `draw_segmentation_masks` without colours takes its palette from the mask's index, whose
first colour is black and the next ones dark, so masks came out as near-black tints; its
`draw_bounding_boxes` writes a label at the box's top-left corner, cut off at the image's right edge.
"""

from __future__ import annotations

import colorsys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.utils import draw_bounding_boxes

__all__ = ["class_colours", "draw_detections", "label_position"]

MASK_ALPHA = 0.5  # the colour's share inside a mask; its outline is the plain colour
_GOLDEN = 0.618033988749895


def class_colours(num_classes: int) -> list[tuple[int, int, int]]:
    """A bright, saturated RGB colour per class; neighbouring labels get far-apart hues (golden-ratio steps)."""
    hues = ((index * _GOLDEN) % 1.0 for index in range(num_classes))
    return [tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.85, 1.0)) for hue in hues]


def label_position(box: tuple[float, float, float, float], text: tuple[int, int], image: tuple[int, int]):
    """The top-left corner of a `text` (width, height) label of `box` (x1, y1, x2, y2) in an `image` (width,
    height): above the box's top-left corner, moved left and down as far as needed to stay inside the image."""
    (x1, y1, _x2, _y2), (text_width, text_height), (width, height) = box, text, image
    x = min(max(int(x1), 0), max(width - text_width, 0))
    y = int(y1) - text_height if y1 >= text_height else int(max(y1, 0))  # inside the box when no room above
    return x, min(y, max(height - text_height, 0))


def draw_detections(
    image: Tensor, boxes: Tensor, labels: Tensor, texts: list[str], masks: Tensor | None = None
) -> np.ndarray:
    """The image (3, H, W) uint8 with the detections drawn: each mask (N, H, W) bool blended with its
    class colour and outlined in it, each box in it, and each text on a label of that colour.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    palette = class_colours(int(labels.max()) + 1 if len(labels) else 0)
    colours = [palette[int(label)] for label in labels]
    canvas = image.clone()
    if masks is not None and len(masks):
        canvas = _blend_masks(canvas, masks.bool(), torch.tensor(colours, dtype=torch.float32))
    if len(boxes):
        canvas = draw_bounding_boxes(canvas, boxes, colors=colours, width=2)
    picture = Image.fromarray(canvas.permute(1, 2, 0).numpy())
    _draw_labels(picture, boxes.tolist(), texts, colours)
    return np.asarray(picture).copy()


def _blend_masks(image: Tensor, masks: Tensor, colours: Tensor) -> Tensor:
    float_masks = masks[:, None].float()  # (N, 1, H, W)
    inner = -F.max_pool2d(-float_masks, 3, stride=1, padding=1)  # eroded by one pixel
    outline = (float_masks - inner)[:, 0].bool()  # (N, H, W)
    out = image.float()
    for mask, edge, colour in zip(masks, outline, colours, strict=True):  # later masks over earlier ones
        colour = colour[:, None]
        out[:, mask] = (1 - MASK_ALPHA) * out[:, mask] + MASK_ALPHA * colour
        out[:, edge] = colour
    return out.round().clamp(0, 255).to(torch.uint8)


def _draw_labels(picture: Image.Image, boxes: list, texts: list[str], colours: list) -> None:
    draw, font = ImageDraw.Draw(picture), ImageFont.load_default()
    for box, text, colour in zip(boxes, texts, colours, strict=True):
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        size = (right - left + 4, bottom - top + 4)  # 2 px of margin around the text
        x, y = label_position(box, size, picture.size)
        draw.rectangle((x, y, x + size[0] - 1, y + size[1] - 1), fill=colour)
        draw.text((x + 2 - left, y + 2 - top), text, fill=(0, 0, 0), font=font)  # black on a bright colour
