"""The exact evaluation sampler, the frozen-aware SyncBatchNorm, batch-scaled learning rates and channels-last."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DistributedSampler

from backbones import create_backbone
from backbones.training import batch_scaled_lr, global_batch_size
from backbones.training.distributed import (
    EvalDistributedSampler,
    FrozenAwareSyncBatchNorm,
    eval_sampler,
    prepare_sync_batchnorm,
)


def _resnet18(**kwargs) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frozen random weights warn; irrelevant here
        return create_backbone("resnet18", **kwargs)


# ---------------------------------------------------------------- the evaluation sampler


@pytest.mark.parametrize(
    ("size", "world_size"),
    [(s, w) for s in (0, 7, 8, 9, 13) for w in (1, 2, 3, 4, 8) if not 0 < s < w],  # 0 < s < w: an error, below
)
def test_eval_sampler_gives_every_index_exactly_once(size, world_size):
    shares = [list(EvalDistributedSampler(range(size), num_replicas=world_size, rank=r)) for r in range(world_size)]
    assert sorted(i for share in shares for i in share) == list(range(size))  # no padding copies, none left out
    assert [len(EvalDistributedSampler(range(size), num_replicas=world_size, rank=r)) for r in range(world_size)] == [
        len(share) for share in shares
    ]
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    if size % world_size:  # torch's sampler pads by repeating: the reason this one exists
        padded = [DistributedSampler(range(size), num_replicas=world_size, rank=r) for r in range(world_size)]
        assert sum(map(len, padded)) > size


def test_eval_sampler_needs_an_item_per_process():
    with pytest.raises(ValueError, match=r"has 3 items for 4 processes.*at most 3 devices"):
        EvalDistributedSampler(range(3), num_replicas=4, rank=0)


def test_eval_sampler_outside_ddp_is_sequential_and_kept_by_lightning():
    sampler = eval_sampler(range(5))
    assert list(sampler) == [0, 1, 2, 3, 4]
    assert isinstance(sampler, DistributedSampler)  # so Lightning does not inject its padding sampler


def _tiny_cls_data(tmp_path):
    from backbones.classification import ShapesClassificationDataModule

    return ShapesClassificationDataModule(
        root=str(tmp_path / "cls"), train_per_class=1, val_per_class=1, image_size=32, num_workers=0, batch_size=2
    )


def test_data_modules_evaluate_with_the_exact_sampler(tmp_path):
    from detection.data import ShapesDataModule
    from segmentation.data import ShapesSegmentationDataModule

    shapes = dict(root=str(tmp_path / "shapes"), num_train=2, num_val=3, image_size=40, seed=1, num_workers=0)
    modules = {
        ShapesDataModule(**shapes): ("val", "test"),  # detection predicts through tools/infer_det.py
        ShapesSegmentationDataModule(**shapes): ("val", "test", "predict"),
        _tiny_cls_data(tmp_path): ("val", "test", "predict"),
    }
    for datamodule, stages in modules.items():
        datamodule.setup("fit")
        for loader in (getattr(datamodule, f"{stage}_dataloader")() for stage in stages):
            assert isinstance(loader.sampler, EvalDistributedSampler), type(datamodule).__name__
            assert list(loader.sampler) == list(range(len(loader.dataset)))


# ---------------------------------------------------------------- SyncBatchNorm


def test_frozen_aware_sync_batchnorm_converts_only_trainable_norms():
    ours = FrozenAwareSyncBatchNorm().apply(_resnet18(frozen_stages=1))
    assert type(ours.bn1) is nn.BatchNorm2d and type(ours.layer1[0].bn1) is nn.BatchNorm2d
    assert type(ours.layer2[0].bn1) is nn.SyncBatchNorm and type(ours.layer4[1].bn2) is nn.SyncBatchNorm
    ours.train()
    assert not ours.layer1[0].bn1.training and ours.layer2[0].bn1.training
    # Lightning's converter turns the frozen ones into SyncBatchNorm that then train their statistics
    theirs = TorchSyncBatchNorm().apply(_resnet18(frozen_stages=1)).train()
    assert type(theirs.layer1[0].bn1) is nn.SyncBatchNorm and theirs.layer1[0].bn1.training

    reverted = FrozenAwareSyncBatchNorm().revert(_resnet18(norm="sync_bn", frozen_stages=1)).train()
    assert not isinstance(reverted.layer1[0].bn1, nn.SyncBatchNorm)
    assert not reverted.layer1[0].bn1.training and reverted.layer2[0].bn1.training  # still frozen after revert


def _ddp_trainer(sync_batchnorm: bool, world_size: int) -> SimpleNamespace:
    strategy = DDPStrategy()
    strategy._layer_sync = TorchSyncBatchNorm() if sync_batchnorm else None  # what Trainer(sync_batchnorm=...) sets
    return SimpleNamespace(strategy=strategy, world_size=world_size)


@pytest.mark.parametrize("sync_batchnorm", [True, False])
def test_lightning_keeps_the_private_layer_sync_we_replace(sync_batchnorm):
    """Pins the private attributes `prepare_sync_batchnorm` reads and swaps: Lightning has no public setter for
    the plugin that `Trainer(sync_batchnorm=True)` makes. A Lightning upgrade that moves them fails here, not
    silently in a user's run (its own converter would turn frozen norms into training SyncBatchNorms)."""
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", sync_batchnorm=sync_batchnorm, logger=False)
    expected = TorchSyncBatchNorm if sync_batchnorm else type(None)
    assert type(trainer.strategy._layer_sync) is expected
    assert type(trainer._accelerator_connector._layer_sync) is expected
    prepare_sync_batchnorm(trainer, _resnet18(frozen_stages=1))
    assert type(trainer.strategy._layer_sync) is (FrozenAwareSyncBatchNorm if sync_batchnorm else type(None))


def test_prepare_sync_batchnorm_installs_the_frozen_aware_plugin():
    trainer = _ddp_trainer(sync_batchnorm=True, world_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_sync_batchnorm(trainer, _resnet18(frozen_stages=1))
    assert type(trainer.strategy._layer_sync) is FrozenAwareSyncBatchNorm
    untouched = _ddp_trainer(sync_batchnorm=False, world_size=2)
    prepare_sync_batchnorm(untouched, _resnet18())
    assert untouched.strategy._layer_sync is None


@pytest.mark.parametrize(
    ("sync_batchnorm", "world_size", "norm", "frozen_stages", "message"),
    [
        (True, 2, "frozen_bn", -1, r"Trainer\(sync_batchnorm=True\), but none of the model's 20 batch norms trains"),
        (True, 2, "bn", 4, "none of the model's 20 batch norms trains"),
        (True, 2, "gn", -1, "the model has no batch norm"),
        (False, 2, "sync_bn", 4, "norm='sync_bn', but none"),
        (True, 1, "bn", -1, "with one process"),
        (False, 1, "sync_bn", -1, "norm='sync_bn' with one process"),
    ],
)
def test_sync_batchnorm_that_does_nothing_warns(sync_batchnorm, world_size, norm, frozen_stages, message):
    with pytest.warns(UserWarning, match=message):
        prepare_sync_batchnorm(
            _ddp_trainer(sync_batchnorm, world_size), _resnet18(norm=norm, frozen_stages=frozen_stages)
        )


# ---------------------------------------------------------------- learning rate


def test_global_batch_counts_devices_nodes_and_accumulation():
    trainer = L.Trainer(
        accelerator="cpu", devices=2, num_nodes=3, strategy="ddp", accumulate_grad_batches=4, logger=False
    )
    assert trainer.world_size == 6
    assert global_batch_size(trainer, 2) == 2 * 2 * 3 * 4


def _stub_trainer(batch_size=None, devices=1, num_nodes=1, accumulate=1):
    datamodule = SimpleNamespace(batch_size=batch_size) if batch_size is not None else None
    return SimpleNamespace(
        datamodule=datamodule, world_size=devices * num_nodes, num_devices=devices, num_nodes=num_nodes,
        accumulate_grad_batches=accumulate,
    )  # fmt: skip


def test_batch_scaled_lr():
    two_nodes = _stub_trainer(batch_size=2, devices=8, num_nodes=2)
    assert batch_scaled_lr(0.02, 16, two_nodes) == pytest.approx(0.02 * 32 / 16)
    assert batch_scaled_lr(0.02, None, two_nodes) == 0.02  # no reference: as given
    assert batch_scaled_lr(0.1, 256, _stub_trainer(batch_size=4, accumulate=2)) == pytest.approx(0.1 * 8 / 256)
    with pytest.raises(ValueError, match="lr_reference_batch_size=0"):
        batch_scaled_lr(0.02, 0, two_nodes)
    with pytest.raises(ValueError, match="needs the per-device batch_size"):
        batch_scaled_lr(0.02, 16, _stub_trainer())


def test_frozen_aware_sync_batchnorm_keeps_timm_norm_act_layers_both_ways():
    from timm.layers import BatchNormAct2d, SyncBatchNormAct

    torch.manual_seed(0)
    model = create_backbone("timm/regnetx_002").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        synced = FrozenAwareSyncBatchNorm().apply(model).eval()
        assert not any(type(m) is nn.SyncBatchNorm for m in synced.modules())  # each one kept its activation
        assert any(isinstance(m, SyncBatchNormAct) for m in synced.modules())
        reverted = FrozenAwareSyncBatchNorm().revert(synced).eval()
        assert not any(isinstance(m, nn.SyncBatchNorm) for m in reverted.modules())
        assert any(type(m) is BatchNormAct2d for m in reverted.modules())
        for name, value in reverted(x).items():
            torch.testing.assert_close(value, expected[name])
