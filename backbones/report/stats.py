"""Bootstrap helpers shared by the reports: image draws with replacement and percentile intervals.

The method is the PASCAL VOC retrospective's (Everingham et al., IJCV 2015): resample the test images with
replacement, recompute the metric on each draw, and read the interval off the draws' percentiles. A draw is a
multiplicity per image, so a metric that is a sum over images (a confusion matrix) is redrawn by one matrix
product of the draws with the per-image terms.

Example:
    >>> draws = image_draws(4, num_draws=2, seed=0)
    >>> draws.shape, draws.sum(axis=1).tolist()
    ((2, 4), [4, 4])
    >>> percentile_interval(np.array([[0.0], [1.0]]), confidence=0.5)[:, 0].tolist()
    [0.25, 0.75]
"""

from __future__ import annotations

import numpy as np

__all__ = ["image_draws", "percentile_interval"]


def image_draws(num_images: int, num_draws: int, seed: int = 0) -> np.ndarray:
    """How often each image is drawn in each of ``num_draws`` resamplings with replacement (seeded).

    Returns:
        (num_draws, num_images) int64 multiplicities; each row sums to ``num_images``.

    Raises:
        ValueError: ``num_images`` or ``num_draws`` is below 1.
    """
    if num_images < 1 or num_draws < 1:
        raise ValueError(f"num_images={num_images}, num_draws={num_draws}; both must be at least 1")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, num_images, size=(num_draws, num_images))  # (D, N) image indices
    rows = np.repeat(np.arange(num_draws), num_images)
    return np.bincount(rows * num_images + picks.ravel(), minlength=num_draws * num_images).reshape(
        num_draws, num_images
    )


def percentile_interval(samples: np.ndarray, confidence: float = 0.95) -> np.ndarray:
    """The two-sided percentile interval of ``samples`` along axis 0, ignoring nan.

    Returns:
        (2, ...) lower and upper bounds; nan where every sample is nan.

    Raises:
        ValueError: ``confidence`` is not in (0, 1).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence}; choose a value in (0, 1)")
    samples = np.asarray(samples, np.float64)
    tail = round(50 * (1 - confidence), 12)  # 2.5 for 0.95, not 2.5000000000000004
    out = np.full((2, *samples.shape[1:]), np.nan)
    present = ~np.isnan(samples).all(axis=0)
    if present.any():
        out[:, present] = np.nanpercentile(samples[:, present], [tail, 100 - tail], axis=0)
    return out
