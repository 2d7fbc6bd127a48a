"""Faults during training: a killed run resumes exactly, a non-finite loss stops training, heads of another size.

The resume test kills a real `tools/train_det.py fit` process with SIGKILL in the middle of its
second epoch and resumes it with `fit --ckpt_path last`; on the CPU with a fixed seed the result
must equal, bit for bit, that of a run that was never stopped. The same for a Ctrl-C (SIGINT) mid-epoch
with the shipped config, whose only mid-epoch checkpoint is the one written on the interrupt (slow).
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import Dataset, DistributedSampler

from backbones import WeightsError
from backbones.classification import ClassificationTask
from backbones.data.shapes import generate_shapes
from backbones.training.samplers import GroupedBatchSampler, SampleKey, SeededSamples, training_state
from detection.models import HEAD_PREFIXES as DETECTION_HEADS
from detection.task import DetectionTask
from segmentation.models import HEAD_PREFIXES as SEGMENTATION_HEADS
from segmentation.task import SegmentationTask
from tests.backbones.training.test_callbacks import RecordSteps
from tests.tools.loader import load_tool

ROOT = Path(__file__).resolve().parents[1]
train_det = load_tool("train_det")

TINY_DETECTOR = dict(
    norm="bn", frozen_stages=-1, anchor_sizes=[8, 16, 32, 64, 128], min_size=64, max_size=64,
    rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=100,
    rpn_post_nms_top_n_test=50, box_batch_size_per_image=32,
)  # fmt: skip
STEPS_PER_EPOCH = 4  # 8 training images, batches of 2


class HoldAtStep(L.Callback):
    """Writes `marker` when batch `step` is about to start, then waits there (for SIGKILL, or until a
    SIGINT or SIGTERM asks the run to stop, which it then does after this step)."""

    def __init__(self, step: int, marker: str, seconds: float = 120.0):
        self.step, self.marker, self.seconds = step, marker, seconds

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            Path(self.marker).write_text(str(os.getpid()))
            deadline = time.monotonic() + self.seconds
            while not trainer.received_sigterm and time.monotonic() < deadline:
                time.sleep(0.05)


class PoisonBoxRegression(L.Callback):
    """Makes the box head's regression output NaN from training step `step` on, after hashing last.ckpt."""

    def __init__(self, step: int):
        self.step = step
        self.checkpoint: Path | None = None
        self.checkpoint_hash: str | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.checkpoint = Path(trainer.checkpoint_callback.last_model_path)
            self.checkpoint_hash = _sha256(self.checkpoint)
            pl_module.model.roi_heads.box_predictor.bbox_pred.register_forward_hook(
                lambda module, inputs, output: torch.full_like(output, float("nan"))
            )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("faults") / "shapes", num_train=8, num_val=2, image_size=64, seed=1)


def fit_args(shapes, run_dir: Path, *, every_n_train_steps: int, max_epochs: int = 2) -> list[str]:
    """`fit` of a tiny Faster R-CNN on the shapes, saving last.ckpt every few steps.

    As with the configs, the checkpoints go to run_dir/lightning_logs/version_N/checkpoints, a new N
    for each run.
    """
    return [
        "fit",
        "--seed_everything=0",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        f"--trainer.max_epochs={max_epochs}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={run_dir}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.gradient_clip_val=10",
        f"--trainer.default_root_dir={run_dir}",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.save_last=true",
        "--trainer.callbacks.save_top_k=0",
        f"--trainer.callbacks.every_n_train_steps={every_n_train_steps}",
        "--model.model=faster_rcnn_r18_fpn",
        f"--model.model_options={TINY_DETECTOR}".replace("'", '"'),
        "--model.lr=0.01",
        "--model.schedule=cosine",
        "--model.warmup=2",
        "--data=detection.data.ShapesDataModule",
        f"--data.root={shapes.root}",
        "--data.num_train=8",
        "--data.num_val=2",
        "--data.image_size=64",
        "--data.seed=1",
        "--data.batch_size=2",
        "--data.num_workers=0",
    ]


@pytest.mark.slow  # two trainings and a third in a process: over a minute on 2 cores
def test_killed_run_resumes_to_the_same_weights_and_metrics(shapes, tmp_path):
    # The reference: 2 epochs of 4 steps, never stopped.
    reference = train_det.main(fit_args(shapes, tmp_path / "reference", every_n_train_steps=3))
    assert reference.trainer.global_step == 2 * STEPS_PER_EPOCH

    # The same run as a process, killed during step 7 (epoch 1, batch 3); its last checkpoint is step 6.
    run_dir, marker = tmp_path / "killed", tmp_path / "holding"
    command = [
        sys.executable, str(ROOT / "tools" / "train_det.py"), *fit_args(shapes, run_dir, every_n_train_steps=3),
        "--trainer.callbacks+=tests.test_faults.HoldAtStep", "--trainer.callbacks.step=7",
        f"--trainer.callbacks.marker={marker}",
    ]  # fmt: skip
    log = tmp_path / "killed.log"
    process = _signal_when_marked(command, marker, log, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL

    last = run_dir / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["global_step"]) == (1, 6)  # mid-epoch: 2 of epoch 1's 4 batches
    assert {"optimizer_states", "lr_schedulers", "loops"} <= set(checkpoint)
    position = checkpoint["ShapesDataModule"]
    assert (position["epoch"], position["batches_done"]) == (1, 2)

    # `--ckpt_path last` finds version_0's last.ckpt although this run logs into version_1.
    resumed = train_det.main([*fit_args(shapes, run_dir, every_n_train_steps=3), "--ckpt_path=last"])
    assert resumed.trainer.ckpt_path == str(last)
    assert resumed.trainer.global_step == reference.trainer.global_step
    assert resumed.trainer.current_epoch == reference.trainer.current_epoch == 2
    expected, actual = reference.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == actual.keys()
    different = [k for k in expected if not torch.equal(expected[k], actual[k])]
    assert not different, f"{len(different)} tensors differ after resuming, e.g. {different[:5]}"
    metrics = reference.trainer.callback_metrics
    assert {"train_loss", "val_bbox_AP", "val_bbox_AP50"} <= set(metrics)
    torch.testing.assert_close(dict(resumed.trainer.callback_metrics), dict(metrics), rtol=0, atol=0, equal_nan=True)


def _signal_when_marked(command: list[str], marker: Path, log: Path, signum: int) -> subprocess.Popen:
    """Runs `command` (its output to `log`), sends it `signum` once `marker` exists and waits for it to end."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    with open(log, "w") as output:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while not marker.exists():
                assert process.poll() is None, f"the run ended before the signal:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"the run never wrote {marker}"
                time.sleep(0.05)
            process.send_signal(signum)
            process.wait(timeout=120)
        finally:
            process.kill()
            process.wait()
    return process


@pytest.mark.slow  # three runs of the detection tool, one a process of its own (50 s on 2 cores)
def test_ctrl_c_mid_epoch_then_ckpt_path_last_continues_from_that_step(shapes, tmp_path):
    """The README's resume line with a real interrupt: the shipped config saves only every 50 steps, so the
    checkpoint that the resumed run starts from is the one written on Ctrl-C, mid-epoch; the resumed run
    ends at the weights of one never stopped."""

    def args(run_dir: Path) -> list[str]:
        config = f"--config={ROOT / 'configs' / 'detection' / 'faster_rcnn_r18_fpn_shapes.yaml'}"
        # the config's own checkpoint callbacks, not those of fit_args
        return [config, *(a for a in fit_args(shapes, run_dir, every_n_train_steps=50)[1:] if "callbacks" not in a)]

    reference = train_det.main(["fit", *args(tmp_path / "reference")])
    marker, run_dir = tmp_path / "pausing", tmp_path / "interrupted"
    command = [sys.executable, str(ROOT / "tools" / "train_det.py"), "fit", *args(run_dir),
               "--trainer.callbacks+=tests.test_faults.HoldAtStep", "--trainer.callbacks.step=5",
               f"--trainer.callbacks.marker={marker}"]  # fmt: skip
    log = tmp_path / "interrupted.log"
    process = _signal_when_marked(command, marker, log, signal.SIGINT)
    assert process.returncode == 1, log.read_text()[-3000:]
    assert "Ctrl-C: stopping after this step" in log.read_text()
    last = run_dir / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["global_step"]) == (1, 6)  # step 6 (epoch 1, batch 2) ended, then saved
    assert (checkpoint["ShapesDataModule"]["epoch"], checkpoint["ShapesDataModule"]["batches_done"]) == (1, 2)

    record = f"--trainer.callbacks+={RecordSteps.__module__}.RecordSteps"
    resumed = train_det.main(["fit", *args(run_dir), "--ckpt_path=last", record])
    assert resumed.trainer.ckpt_path == str(last)
    steps = next(cb for cb in resumed.trainer.callbacks if isinstance(cb, RecordSteps)).steps
    assert steps == [6, 7] and resumed.trainer.global_step == 2 * STEPS_PER_EPOCH
    expected, actual = reference.model.state_dict(), resumed.model.state_dict()
    different = [k for k in expected if not torch.equal(expected[k], actual[k])]
    assert not different, f"{len(different)} tensors differ after resuming, e.g. {different[:5]}"
    assert {"val_bbox_AP", "val_bbox_AP50"} <= set(resumed.trainer.callback_metrics)  # finished, validated


def _grouped(epoch: int | None = None, resume: tuple[int, int] | None = None) -> GroupedBatchSampler:
    sampler = DistributedSampler(range(10), num_replicas=1, rank=0, shuffle=True, seed=3)
    grouped = GroupedBatchSampler(sampler, [i % 2 for i in range(10)], 3, seed=3)
    if epoch is not None:
        sampler.set_epoch(epoch)  # as Lightning does: on the sampler, not on the batch sampler
    if resume is not None:
        grouped.resume_at(*resume)
    return grouped


def test_grouped_batches_follow_the_sampler_epoch_and_resume_where_they_stopped():
    epoch0, epoch1 = list(_grouped(epoch=0)), list(_grouped(epoch=1))
    assert all(isinstance(key, SampleKey) for batch in epoch1 for key in batch)
    seeds = [{key.index: key.seed for batch in batches for key in batch} for batches in (epoch0, epoch1)]
    assert seeds[0].keys() == seeds[1].keys() and all(seeds[0][i] != seeds[1][i] for i in seeds[0])
    resumed = _grouped(resume=(1, 2))
    assert list(resumed) == epoch1[2:]
    assert list(resumed) == epoch1  # the skip is for the first pass only
    with pytest.raises(ValueError, match="batches_done=9; an epoch here has 4 batches"):
        _grouped().resume_at(1, 9)


def test_plain_batches_and_a_resume_that_survives_lightning_remaking_the_batch_sampler():
    """Under DDP Lightning re-makes a custom batch sampler around its own DistributedSampler, from the
    constructor arguments it recorded: `resume` is one of them, so the skip is not lost."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import BatchSampler, DataLoader

    def sampler(replicas: int, epoch: int) -> DistributedSampler:
        sampler = DistributedSampler(range(20), num_replicas=replicas, rank=0, shuffle=True, seed=3)
        sampler.set_epoch(epoch)
        return sampler

    plain = GroupedBatchSampler(sampler(1, 0), None, 3, drop_last=True)
    assert list(plain) == list(BatchSampler(sampler(1, 0), 3, drop_last=True)) and len(plain) == 6
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):  # as Lightning
        loader = DataLoader(range(20), batch_sampler=GroupedBatchSampler(sampler(1, 0), None, 3, resume=(1, 2)))
    swapped = _update_dataloader(loader, sampler(2, 0)).batch_sampler  # rank 0 of 2: 10 indices, 4 batches
    assert swapped is not loader.batch_sampler and swapped.sampler.num_replicas == 2
    assert list(swapped) == list(GroupedBatchSampler(sampler(2, 1), None, 3))[2:]


def _tiny_task_and_data(kind: str, root: Path):
    if kind == "segmentation":
        from segmentation.data import ShapesSegmentationDataModule

        data = ShapesSegmentationDataModule(root=str(root), num_train=6, num_val=1, image_size=32, batch_size=2,
                                            num_workers=0)  # fmt: skip
        options = {"norm": "gn", "frozen_stages": -1, "aspp_channels": 8, "decoder_channels": 8}
        return SegmentationTask(model="deeplabv3plus_r18", model_options=options, lr=0.01), data
    from backbones.classification import ShapesClassificationDataModule

    data = ShapesClassificationDataModule(root=str(root), train_per_class=1, val_per_class=1, image_size=32,
                                          batch_size=2, num_workers=0)  # fmt: skip
    return ClassificationTask(model="resnet18", model_options={"norm": "gn"}, lr=0.01), data


@pytest.mark.parametrize("kind", ["segmentation", "classification"])
def test_segmentation_and_classification_resume_mid_epoch_to_the_same_weights(kind, tmp_path):
    """6 images in batches of 2, 2 epochs: resuming from the checkpoint of step 4 (epoch 1, one batch
    done) must end with the weights of the run that never stopped."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(ckpt_path=None, callbacks=()):
        L.seed_everything(0, verbose=False)
        task, data = _tiny_task_and_data(kind, tmp_path / "data")
        trainer = L.Trainer(
            max_epochs=2, limit_val_batches=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
            accelerator="cpu", default_root_dir=tmp_path, callbacks=list(callbacks),
            enable_checkpointing=bool(callbacks),
        )  # fmt: skip
        trainer.fit(task, data, ckpt_path=ckpt_path)
        assert trainer.global_step == 6
        return task.state_dict()

    checkpoints = ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1, filename="{step}")
    reference = fit(callbacks=[checkpoints])
    mid_epoch = tmp_path / "ckpt" / "step=4.ckpt"
    position = torch.load(mid_epoch, map_location="cpu", weights_only=True)
    assert (position["epoch"], position["global_step"]) == (1, 4)
    assert {(s["epoch"], s["batches_done"]) for k, s in position.items() if k.endswith("DataModule")} == {(1, 1)}
    resumed = fit(ckpt_path=mid_epoch)
    different = [k for k in reference if not torch.equal(reference[k], resumed[k])]
    assert not different, f"{len(different)} tensors differ after resuming, e.g. {different[:5]}"


class _Noise(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.rand(3)  # a random augmentation


def test_seeded_samples_repeat_their_augmentation_and_leave_the_global_rng_alone():
    samples, before = SeededSamples(_Noise()), torch.get_rng_state()
    first, again, other = samples[SampleKey(1, 42)], samples[SampleKey(1, 42)], samples[SampleKey(1, 43)]
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize(("processed", "last", "expected"), [(2, False, (1, 2)), (4, True, (2, 0)), (0, False, (1, 0))])
def test_training_state_points_at_the_next_batch(processed, last, expected):
    progress = SimpleNamespace(current=SimpleNamespace(processed=processed), is_last_batch=last)
    trainer = SimpleNamespace(
        state=SimpleNamespace(fn="fit"), current_epoch=1, num_training_batches=4,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)),
    )  # fmt: skip
    state = training_state(trainer)
    assert (state["epoch"], state["batches_done"]) == expected
    assert torch.equal(state["torch_rng_state"], torch.get_rng_state())
    assert training_state(SimpleNamespace(state=SimpleNamespace(fn="validate"))) == {}


def test_non_finite_loss_stops_training_and_keeps_the_last_checkpoint(shapes, tmp_path):
    cli = train_det.main(fit_args(shapes, tmp_path, every_n_train_steps=2, max_epochs=1)[1:], run=False)  # no "fit"
    poison = PoisonBoxRegression(step=3)
    cli.trainer.callbacks.append(poison)
    with pytest.raises(FloatingPointError, match=r"step 3: .*loss_classifier=\S+, loss_box_reg=nan") as error:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert "loss_objectness=" in str(error.value) and "loss_rpn_box_reg=" in str(error.value)  # every term
    last = poison.checkpoint
    assert last.name == "last.ckpt" and poison.checkpoint_hash == _sha256(last)  # not rewritten after the bad step
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())
    task = DetectionTask.load_from_checkpoint(last, map_location="cpu", weights_only=True)
    assert task.hparams.num_classes == 4


@pytest.mark.parametrize("kind", ["classification", "segmentation"])
def test_every_task_stops_at_a_non_finite_loss(kind):
    images = torch.full((2, 3, 32, 32), float("nan"))
    if kind == "classification":
        task, batch, term = ClassificationTask(model="resnet18", num_classes=3), (images, torch.tensor([0, 1])), "loss"
    else:
        task = SegmentationTask(model="deeplabv3plus_r18", num_classes=3, aux_loss=True)
        batch, term = (images, torch.zeros(2, 32, 32, dtype=torch.int64)), "loss_out"
    with pytest.raises(FloatingPointError, match=rf"step 0: {term}=nan"):
        task.training_step(batch, 0)


def _lightning_checkpoint(model: torch.nn.Module, path: Path) -> str:
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
    return str(path)


@pytest.mark.parametrize("kind", ["detection", "segmentation"])
def test_checkpoint_with_other_classes_names_the_heads_and_loads_with_fresh_heads(kind, tmp_path):
    if kind == "detection":
        options = dict(model="faster_rcnn_r18_fpn", model_options=dict(norm="bn", frozen_stages=-1))
        make, heads = (lambda **kw: DetectionTask(**options, **kw)), DETECTION_HEADS
        expected = r"roi_heads\.box_predictor\.cls_score\.weight: checkpoint \(91, 1024\) vs model \(4, 1024\)"
    else:
        options = dict(model="deeplabv3plus_r18", aux_loss=True)
        make, heads = (lambda **kw: SegmentationTask(**options, **kw)), SEGMENTATION_HEADS
        expected = r"classifier\.predictor\.weight: checkpoint \(91, 256, 1, 1\) vs model \(4, 256, 1, 1\)"
    source = make(num_classes=91).model  # "COCO"
    weights = _lightning_checkpoint(source, tmp_path / "coco.ckpt")

    with pytest.raises(WeightsError, match=expected) as error:
        make(num_classes=4, weights=weights)
    assert "fresh_heads=True" in str(error.value)

    torch.manual_seed(7)
    fresh = make(num_classes=4).model.state_dict()
    torch.manual_seed(7)
    tuned = make(num_classes=4, weights=weights, fresh_heads=True).model.state_dict()
    trained = source.state_dict()
    head_keys = [k for k in tuned if k.startswith(heads)]
    assert head_keys and all(torch.equal(tuned[k], fresh[k]) for k in head_keys)  # as initialised
    assert all(torch.equal(tuned[k], trained[k]) for k in tuned if k not in head_keys)  # the rest from the checkpoint


def test_fresh_heads_does_not_hide_another_architecture(tmp_path):
    weights = _lightning_checkpoint(SegmentationTask(model="deeplabv3_r18", num_classes=4).model, tmp_path / "v3.ckpt")
    for fresh_heads in (False, True):
        with pytest.raises(WeightsError, match="unexpected keys") as error:
            SegmentationTask(model="deeplabv3plus_r18", num_classes=4, weights=weights, fresh_heads=fresh_heads)
        assert "fresh_heads=True" not in str(error.value)  # it would not help


@pytest.mark.parametrize("kind", ["detection", "segmentation", "classification"])
def test_a_fine_tuned_checkpoint_loads_without_its_pretrained_weights(kind, tmp_path):
    """Offline, or with the weights file gone: the tools load the checkpoint, which holds every weight."""
    from torchvision.models import resnet18
    from torchvision.ops import FrozenBatchNorm2d

    from backbones.weights import load_task_checkpoint

    torch.manual_seed(0)
    pretrained = tmp_path / "resnet18-imagenet.pth"
    torch.save(resnet18().state_dict(), pretrained)
    if kind == "detection":
        task = DetectionTask(model="faster_rcnn_r18_fpn", num_classes=4, backbone_weights=str(pretrained))
        assert any(isinstance(m, FrozenBatchNorm2d) for m in task.model.modules())  # the pretrained norm policy
    elif kind == "segmentation":
        task = SegmentationTask(model="deeplabv3plus_r18", num_classes=4, backbone_weights=str(pretrained))
    else:
        task = ClassificationTask(model="resnet18", num_classes=4, weights=str(pretrained))
    with torch.no_grad():
        for parameter in task.parameters():  # "fine-tuned": no longer the pretrained weights
            parameter.add_(torch.randn_like(parameter))
    path = tmp_path / "tuned.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                "pytorch-lightning_version": L.__version__}, path)  # fmt: skip
    pretrained.unlink()  # as on a machine without it (a tag offline would fail the same way)

    loaded = load_task_checkpoint(type(task), path)
    assert loaded.hparams == task.hparams
    expected = task.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())
    # outside the tools the file is still needed
    with pytest.raises(FileNotFoundError, match=re.escape("resnet18-imagenet.pth")):
        type(task)(**task.hparams)
