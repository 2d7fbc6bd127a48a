"""The task door (`backbones.tasks`): each task's adapters are found through it, and a new task needs no tool edit."""

import pytest
from torch import nn

import backbones.tasks
from backbones.registry import UnknownNameError, create_model
from backbones.task_benchmark import TaskBenchmark, benchmark_adapter, benchmark_models
from backbones.tasks import TaskEntry, get_task, list_tasks, task_of
from tests.tools.loader import load_tool

PLUGIN_MODELS = ("plugin_r18",)


class PluginBenchmark(TaskBenchmark):
    """A task of a plugin: our ResNet-18 under another name, beside torchvision's, 10 classes."""

    task = "plugin"
    counterparts = {"plugin_r18": "resnet18"}  # noqa: RUF012
    num_classes = 10

    def torchvision_builder(self, name):
        from torchvision import models

        return getattr(models, self.counterparts[name])

    def build_ours(self, name: str, image_size: int) -> nn.Module:
        return create_model("resnet18", num_classes=self.num_classes)


@pytest.fixture
def plugin_task(monkeypatch):
    list_tasks()  # the built-in tasks first
    entry = TaskEntry(
        name="plugin", task="plugin.task:PluginTask", models=("tests.backbones.test_tasks:PLUGIN_MODELS",),
        export="backbones.classification.export:ClassificationExport", train_tool="tools/train_plugin.py",
        benchmark="tests.backbones.test_tasks:PluginBenchmark",
    )  # fmt: skip
    monkeypatch.setitem(backbones.tasks._TASKS, "plugin", entry)
    return entry


def test_every_task_benchmarks_only_models_it_builds():
    assert list_tasks() == ["classification", "detection", "segmentation"]
    for name in list_tasks():
        adapter = get_task(name).benchmark_adapter()
        assert adapter.task == name and adapter.counterparts and adapter.num_classes > 1
        for model in adapter.counterparts:
            assert task_of(model).name == name and benchmark_adapter(model).task == name
    assert benchmark_models()[:3] == ["resnet18", "resnet50", "resnet101"]


def test_a_model_without_a_counterpart_is_named():
    with pytest.raises(UnknownNameError, match=r"'resnet34' has no torchvision counterpart.*closest: resnet"):
        benchmark_adapter("resnet34")


def test_segmentation_adapter_refuses_a_batch_deeplab_cannot_train():
    adapter = benchmark_adapter("deeplabv3_r50")
    assert "cannot train DeepLab" in adapter.check("deeplabv3_r50", 1, ["train"])
    assert adapter.check("deeplabv3_r50", 1, ["inference"]) is None


def test_a_plugin_task_is_benchmarked_without_editing_the_tool(plugin_task, capsys):
    assert task_of("plugin_r18") is plugin_task and "plugin_r18" in benchmark_models()
    report = load_tool("benchmark").main([
        "--model", "plugin_r18", "--batch-size", "2", "--image-size", "32", "--warmup", "0", "--repeats", "1",
        "--modes", "inference,train", "--no-memory",
    ])  # fmt: skip
    assert isinstance(report, dict), capsys.readouterr().err
    assert report["output_relative_difference"] < 1e-4 and report["output_compared"] == "outputs"
    assert set(report["ratios"]) == {"inference", "train"}
