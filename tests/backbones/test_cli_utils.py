"""backbones.cli_utils: what the command-line tools share."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import torch

from backbones.cli_utils import (
    EXIT_BAD_INPUT,
    add_inference_arguments,
    autocast,
    output_paths,
    parse_device,
    read_batches,
    reports_errors,
)


def test_reports_errors_prints_one_line_and_returns_2(capsys):
    @reports_errors("some_tool", errors=(KeyError, ValueError))
    def main(problem):
        raise problem

    assert main(ValueError("bad.json: malformed JSON")) == EXIT_BAD_INPUT == 2
    assert capsys.readouterr().err == "some_tool: error: bad.json: malformed JSON\n"
    assert main(KeyError("unknown backbone 'x'")) == 2
    assert capsys.readouterr().err == "some_tool: error: unknown backbone 'x'\n"  # not the KeyError's repr
    with pytest.raises(TypeError):  # not bad input: a bug, with its traceback
        main(TypeError("oops"))
    assert reports_errors("some_tool")(lambda: None)() == 0


def test_inference_arguments_defaults_and_checks(capsys):
    parser = argparse.ArgumentParser(prog="infer_x")
    add_inference_arguments(parser, default_output="out")
    args = parser.parse_args(["images"])
    assert args.device == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert (args.batch_size, args.precision, args.recursive, args.output) == (1, "fp32", False, Path("out"))
    for bad, message in [
        (["--batch-size", "0"], "argument --batch-size: '0'; give a positive number"),
        (["--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
        (["--device", "tpu"], "argument --device: 'tpu' is not a device"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(["images", *bad])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert f"infer_x: error: {message}" in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_named():
    with pytest.raises(argparse.ArgumentTypeError, match="'cuda': torch sees no CUDA device here; use cpu"):
        parse_device("cuda")


def test_autocast_runs_the_network_in_the_precision_asked():
    x, weight = torch.randn(2, 8), torch.randn(8, 3)
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        with autocast("cpu", precision):
            assert (x @ weight).dtype == dtype
    with pytest.raises(ValueError, match="precision='int8'; choose one of fp32, bf16, fp16"):
        autocast("cpu", "int8")


def test_read_batches_processes_every_image_before_a_bad_one():
    def read(name):
        if name == "bad":
            raise ValueError("bad: cannot be decoded")
        return name.upper()

    batches = read_batches(["a", "b", "c", "bad", "d"], read, batch_size=2)
    assert next(batches) == [("a", "A"), ("b", "B")]
    assert next(batches) == [("c", "C")]  # the images read before the bad one
    with pytest.raises(ValueError, match="bad: cannot be decoded"):
        next(batches)


def test_read_batches_keeps_one_size_per_batch_with_a_key():
    sizes = {"a": (4, 4), "b": (4, 4), "c": (8, 4), "d": (8, 4), "e": (8, 4)}
    batches = read_batches(sizes, sizes.get, batch_size=2, key=lambda size: size)
    assert [[name for name, _ in batch] for batch in batches] == [["a", "b"], ["c", "d"], ["e"]]


def test_output_paths_mirror_subfolders_and_never_overwrite_an_input(tmp_path):
    images = [tmp_path / "a.jpg", tmp_path / "sub" / "b.png"]
    assert output_paths(images, tmp_path, tmp_path / "out", "_overlay.png") == [
        tmp_path / "out" / "a_overlay.png", tmp_path / "out" / "sub" / "b_overlay.png",
    ]  # fmt: skip
    assert output_paths(images[:1], images[0], tmp_path / "out", ".jpg") == [tmp_path / "out" / "a.jpg"]
    with pytest.raises(
        ValueError, match=re.escape("a.jpg: writing it would overwrite the input image; choose another --output")
    ):
        output_paths(images, tmp_path, tmp_path, ".jpg")
