import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from segmentation.evaluation import SegmentationEvaluator, format_per_class_table, metrics_from_confusion

# 4 classes; class 3 is absent from both ground truth and predictions.
TARGET = torch.tensor([[0, 0, 1, 1], [0, 2, 2, 255], [1, 1, 2, 255]])
PREDICTION = torch.tensor([[0, 1, 1, 1], [0, 2, 0, 0], [1, 2, 2, 1]])


def hand_computed():
    # rows: ground truth, columns: prediction, ignore (255) pixels skipped
    confusion = np.array([[2, 1, 0, 0], [0, 3, 1, 0], [1, 0, 2, 0], [0, 0, 0, 0]])
    iou = [2 / (3 + 3 - 2), 3 / (4 + 4 - 3), 2 / (3 + 3 - 2), math.nan]
    acc = [2 / 3, 3 / 4, 2 / 3, math.nan]
    return confusion, iou, acc


def test_confusion_matrix_and_metrics_match_hand_computation():
    evaluator = SegmentationEvaluator(4, class_names=["bg", "a", "b", "c"])
    evaluator.update(PREDICTION[None], TARGET[None])
    metrics = evaluator.compute()
    confusion, iou, acc = hand_computed()
    np.testing.assert_array_equal(evaluator.total_confusion.numpy(), confusion)
    assert metrics["mIoU"] == pytest.approx(np.nanmean(iou))
    assert metrics["pixel_acc"] == pytest.approx(7 / 10)
    assert metrics["mean_acc"] == pytest.approx(np.nanmean(acc))
    per_class = evaluator.per_class()
    assert [per_class[n]["IoU"] for n in ("bg", "a", "b")] == pytest.approx(iou[:3])
    assert math.isnan(per_class["c"]["IoU"]) and math.isnan(per_class["c"]["acc"])


def test_absent_class_is_left_out_of_the_mean_but_a_false_positive_class_counts():
    evaluator = SegmentationEvaluator(3)
    evaluator.update(torch.tensor([[0, 0, 1, 1]]), torch.tensor([[0, 0, 1, 1]]))
    assert evaluator.compute()["mIoU"] == 1.0  # class 2: never present, never predicted
    evaluator.update(torch.tensor([[2]]), torch.tensor([[0]]))
    assert metrics_from_confusion(evaluator.total_confusion)["iou"][2].isnan()
    iou = metrics_from_confusion(evaluator.confusion)["iou"]
    assert iou[2] == 0 and evaluator.compute()["mIoU"] == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_ignore_index_pixels_do_not_count_and_logits_are_accepted():
    evaluator = SegmentationEvaluator(2)
    logits = torch.zeros(1, 2, 1, 3)
    logits[0, 1, 0, 1:] = 1  # predicts 0, 1, 1
    evaluator.update(logits, torch.tensor([[[0, 255, 1]]]))
    assert evaluator.confusion.tolist() == [[1, 0], [0, 1]]


def test_reset_and_accumulation_over_batches():
    evaluator = SegmentationEvaluator(4)
    for row in range(3):
        evaluator.update(PREDICTION[row : row + 1], TARGET[row : row + 1])
    np.testing.assert_array_equal(evaluator.confusion.numpy(), hand_computed()[0])
    evaluator.compute()
    assert evaluator.compute()["pixel_acc"] == pytest.approx(0.7)  # compute does not add twice
    evaluator.reset()
    assert evaluator.confusion.sum() == 0


def test_labels_outside_the_classes_are_named():
    evaluator = SegmentationEvaluator(3)
    with pytest.raises(ValueError, match=r"\[7\]"):
        evaluator.update(torch.tensor([[0, 1]]), torch.tensor([[0, 7]]))


def test_table_shows_absent_classes_as_dash():
    evaluator = SegmentationEvaluator(4, class_names=["bg", "a", "b", "c"])
    evaluator.update(PREDICTION, TARGET)
    evaluator.compute()
    table = format_per_class_table(evaluator.per_class())
    assert table.splitlines()[-1].split()[:2] == ["c", "-"]
    assert "0.5000" in table and "50.00" not in table  # bg IoU 2/4, a fraction as in the logs


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        evaluator = SegmentationEvaluator(4, per_image=True)
        rows = [0, 2] if rank == 0 else [1]  # each rank sees part of the data, as eval_sampler deals it
        evaluator.update(PREDICTION[rows], TARGET[rows])
        metrics = evaluator.compute()
        per_image = (evaluator.per_image_statistics.tolist(), evaluator.image_indices.tolist())
        queue.put((rank, metrics, evaluator.total_confusion.tolist(), per_image))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes, each importing torch
def test_confusion_matrix_is_summed_over_processes():
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.start_processes(_rank_worker, args=(_free_port(), queue), nprocs=2, start_method="spawn")
    results = sorted(queue.get() for _ in range(2))
    expected = hand_computed()[0].tolist()
    alone = SegmentationEvaluator(4, per_image=True)
    alone.update(PREDICTION, TARGET)
    alone.compute()
    for _, metrics, confusion, (statistics, indices) in results:
        assert confusion == expected
        assert statistics == alone.per_image_statistics.tolist() and indices == [0, 1, 2]  # gathered in data order
        assert metrics["pixel_acc"] == pytest.approx(0.7)
