"""Annotation memory at full scale: our COCO store and image-folder reader beside torchvision's and pycocotools'.

    python tools/benchmark_data.py --workdir /scratch/bench [--images 118287] [--folder-images 1281167] [--json r.json]

Generates (once per setting, in ``--workdir``) a synthetic COCO-train-size set: ``--images`` images of
640x480 with 860,001/118,287 polygon annotations per image on average (placed at random), each polygon
8-40 points with two-decimal coordinates, 80 categories with COCO's ids; the image files are symlinks to
a pool of 8 JPEGs. Then, each loader in a fresh subprocess: load time and peak RSS (``ru_maxrss``) of pycocotools'
``COCO()``, torchvision's ``CocoDetection``, and ours (``detection.coco.CocoDetection``) first (with
masks, building its cache) and cached; then a random-order pass over every sample with 2 loader
workers, each worker's private memory (USS: Private_Clean + Private_Dirty of /proc/<pid>/smaps_rollup)
read every ``--every`` samples. The pass reads targets only (ours: boxes and labels; torchvision's: its
annotation dicts): pixels and mask decoding cost the same in every reader and do not grow memory.

The same for an ImageNet-size image-folder tree (``--folder-classes`` folders, ``--folder-images``
empty files): listing time, peak RSS and worker growth of our ``ImageFolder`` and torchvision's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

COCO_ANNOTATIONS_PER_IMAGE = 860_001 / 118_287
COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]  # 80 ids
IMAGE_SIZE = (480, 640)  # (H, W)
POOL = 8


# ------------------------------------------------------------------------------------------------ generators


def _polygon_pool(rng: np.random.Generator, size: int) -> list[tuple[str, str, float]]:
    """``size`` random polygons of 8-40 points in a 640x480 image: (JSON of the polygon, of its bbox, area)."""
    height, width = IMAGE_SIZE
    pool = []
    for _ in range(size):
        points = int(rng.integers(8, 41))
        centre = rng.uniform([40, 40], [width - 40, height - 40])
        angles = np.sort(rng.uniform(0, 2 * np.pi, points))
        radius = rng.uniform(5, 40, points)
        xy = np.round(centre + radius[:, None] * np.stack([np.cos(angles), np.sin(angles)], 1), 2)
        low, high = xy.min(0), xy.max(0)
        bbox = [*low.tolist(), *np.round(high - low, 2).tolist()]
        pool.append((json.dumps([xy.ravel().tolist()]), json.dumps(bbox), round(float(np.prod(high - low)), 2)))
    return pool


def _generate_coco(folder: Path, num_images: int, seed: int) -> None:
    """Writes ``images/`` (symlinks to a pool of JPEGs) and ``instances.json``, entry by entry.

    The polygons are drawn from a pool of 20,000 random ones, which makes writing 860,001 of them take
    seconds; reading costs what unique ones would (the JSON parser makes an object per number).
    """
    import cv2

    rng = np.random.default_rng(seed)
    height, width = IMAGE_SIZE
    (folder / "pool").mkdir()
    (folder / "images").mkdir()
    for k in range(POOL):
        cv2.imwrite(str(folder / "pool" / f"{k}.jpg"), np.full((height, width, 3), 30 * k, np.uint8))
    polygons = _polygon_pool(rng, min(20_000, 1 + num_images * 8))
    total = round(num_images * COCO_ANNOTATIONS_PER_IMAGE)
    image_of = np.sort(rng.integers(1, num_images + 1, total)).tolist()  # about 7.3 per image, some with none
    drawn = rng.integers(0, len(polygons), total).tolist()
    categories = rng.choice(COCO_CATEGORY_IDS, total).tolist()
    with open(folder / "instances.json", "w") as f:
        f.write('{"info": {"description": "synthetic COCO-train-size set"}, "images": [')
        for image_id in range(1, num_images + 1):
            name = f"{image_id:012d}.jpg"
            os.symlink(Path("..") / "pool" / f"{image_id % POOL}.jpg", folder / "images" / name)
            entry = {"id": image_id, "file_name": name, "height": height, "width": width}
            f.write(("," if image_id > 1 else "") + json.dumps(entry))
        f.write('], "annotations": [')
        for annotation_id, (image_id, k, category_id) in enumerate(zip(image_of, drawn, categories, strict=True), 1):
            segmentation, bbox, area = polygons[k]
            f.write(f'{"," if annotation_id > 1 else ""}{{"id": {annotation_id}, "image_id": {image_id}, '
                    f'"category_id": {category_id}, "segmentation": {segmentation}, "area": {area}, '
                    f'"bbox": {bbox}, "iscrowd": 0}}')  # fmt: skip
        categories = [{"id": i, "name": f"category{i}", "supercategory": "thing"} for i in COCO_CATEGORY_IDS]
        f.write('], "categories": ' + json.dumps(categories) + "}")


def _generate_folders(folder: Path, num_images: int, num_classes: int) -> None:
    """``num_classes`` class folders holding ``num_images`` empty ``.JPEG`` files in all."""
    per_class = np.full(num_classes, num_images // num_classes)
    per_class[: num_images % num_classes] += 1
    for k, count in enumerate(per_class.tolist()):
        class_folder = folder / f"n{k:08d}"
        class_folder.mkdir()
        for i in range(count):
            (class_folder / f"n{k:08d}_{i}.JPEG").touch()


def _generated(root: Path, params: dict, write) -> Path:
    from backbones.data.cache import build_once

    return build_once(root, params, write)


# ------------------------------------------------------------------------------------------ measurements


def _uss_mb(pid: int) -> float:
    """Private memory of a process: Private_Clean + Private_Dirty from smaps_rollup, in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    return sum(int(fields[key].split()[0]) for key in ("Private_Clean", "Private_Dirty")) / 1024


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


class _Reads:
    """A dataset of ``read(index)``: what a loader worker does for one sample, minus the pixels."""

    def __init__(self, read, length: int):
        self.read, self.length = read, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        self.read(index)
        return 0


def _summary(batch: list) -> tuple[int, int]:
    return len(batch), os.getpid()  # little goes back to the main process: the workers' memory is measured


def _worker_pass(read, length: int, every: int, seed: int) -> list[dict]:
    """Reads every index once in random order with 2 workers; each worker's USS every ``every`` samples."""
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    sampler = RandomSampler(range(length), generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(_Reads(read, length), batch_size=32, sampler=sampler, num_workers=2, collate_fn=_summary)
    rows, seen, pids, next_report = [], 0, [], every
    for count, pid in loader:
        if pid not in pids:  # a worker's memory after its first batch: the start of its growth
            pids.append(pid)
            rows.append({"samples": seen, "pid": pid, "uss_mb": _uss_mb(pid)})
        seen += count
        if seen >= next_report or seen == length:
            rows += [{"samples": seen, "pid": p, "uss_mb": _uss_mb(p)} for p in pids]
            next_report += every
    return rows


def _rss_mb() -> float:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status["VmRSS"].split()[0]) / 1024


def _quiet(function, *args):
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        return function(*args)


def _open_loader(mode: str, path: str, images: str):
    """``(load, read)``: ``load()`` returns the loaded object, ``read(obj)`` a function of a sample index.

    Imports only what ``mode`` uses, before the clock starts.
    """
    if mode == "pycocotools":
        from pycocotools.coco import COCO

        return lambda: _quiet(COCO, path), None
    if mode == "torchvision-coco":
        from torchvision.datasets import CocoDetection

        # What its __getitem__ does besides decoding the image.
        return lambda: _quiet(CocoDetection, images, path), lambda d: lambda i: d._load_target(d.ids[i])
    if mode == "ours-coco-first":
        from detection.coco import CocoDetection

        return lambda: CocoDetection(images, path, with_masks=True), None
    if mode == "ours-coco-cached":  # the same store; the pass reads boxes and labels, as torchvision's reads dicts
        from detection.coco import CocoDetection

        return lambda: CocoDetection(images, path), lambda d: d.target
    if mode == "torchvision-folder":
        from torchvision.datasets import ImageFolder

        return lambda: ImageFolder(path), lambda d: d.samples.__getitem__
    assert mode == "ours-folder", mode
    from backbones.classification.data import ImageFolder, list_classes

    return lambda: ImageFolder(path, list_classes(path)), lambda d: lambda i: (d.path(i), d.targets[i])


def _child(mode: str, path: str, images: str, every: int, seed: int) -> dict:
    """One loader, measured in this (fresh) process: the libraries are imported before the clock starts."""
    load, read = _open_loader(mode, path, images)
    before = _rss_mb()
    start = time.perf_counter()
    loaded = load()
    result = {"mode": mode, "load_s": time.perf_counter() - start, "peak_rss_mb": _peak_rss_mb(),
              "loaded_rss_mb": _rss_mb() - before}  # fmt: skip
    if read is not None:
        result["pass"] = _worker_pass(read(loaded), len(loaded), every, seed)
    return result


def _run_child(mode: str, path: Path, images: Path | None, args: argparse.Namespace, cache: Path) -> dict:
    command = [sys.executable, __file__, "--child", mode, str(path), str(images or ""), str(args.every)]
    env = {**os.environ, "RESBONE_CACHE": str(cache)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _growth(rows: list[dict]) -> float:
    """The largest growth of one worker's USS over the pass, in MB."""
    by_pid: dict[int, list[float]] = {}
    for row in rows:
        by_pid.setdefault(row["pid"], []).append(row["uss_mb"])
    return max(values[-1] - values[0] for values in by_pid.values())


def benchmark(args: argparse.Namespace) -> dict:
    workdir = Path(args.workdir)
    coco = _generated(workdir / f"coco-{args.images}", {"images": args.images, "seed": 0},
                      lambda folder: _generate_coco(folder, args.images, 0))  # fmt: skip
    folders = _generated(
        workdir / f"folders-{args.folder_classes}-{args.folder_images}",
        {"images": args.folder_images, "classes": args.folder_classes},
        lambda folder: _generate_folders(folder, args.folder_images, args.folder_classes),
    )
    cache = workdir / "cache"
    shutil.rmtree(cache, ignore_errors=True)  # "first" builds the store; "cached" maps it
    json_path, images = coco / "instances.json", coco / "images"
    runs = [_run_child(mode, json_path, images, args, cache)
            for mode in ("pycocotools", "torchvision-coco", "ours-coco-first", "ours-coco-cached")]  # fmt: skip
    runs += [_run_child(mode, folders, None, args, cache) for mode in ("torchvision-folder", "ours-folder")]
    for run in runs:
        if "pass" in run:
            run["worker_growth_mb"] = _growth(run["pass"])
    config = {"images": args.images, "annotations": round(args.images * COCO_ANNOTATIONS_PER_IMAGE),
              "json_mb": json_path.stat().st_size / 1e6, "folder_images": args.folder_images,
              "folder_classes": args.folder_classes, "every": args.every}  # fmt: skip
    return {"config": config, "runs": runs}


def markdown(report: dict) -> list[str]:
    config = report["config"]
    lines = [
        f"COCO: {config['images']} images, {config['annotations']} polygons, {config['json_mb']:.0f} MB JSON; "
        f"folders: {config['folder_classes']} classes, {config['folder_images']} files",
        "",
        "| loader | load s | peak RSS MB | RSS added by the load MB | worker USS growth MB (start -> end, 2 workers) |",
        "|---|---:|---:|---:|---|",
    ]
    for run in report["runs"]:
        growth = "-"
        if "pass" in run:
            ends = {}
            for row in run["pass"]:
                ends.setdefault(row["pid"], []).append(row["uss_mb"])
            spans = ", ".join(f"{v[0]:.0f} -> {v[-1]:.0f}" for v in ends.values())
            growth = f"{run['worker_growth_mb']:.1f} ({spans})"
        numbers = f"{run['load_s']:.2f} | {run['peak_rss_mb']:.0f} | {run['loaded_rss_mb']:.0f}"
        lines.append(f"| {run['mode']} | {numbers} | {growth} |")
    return lines


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        mode, path, images, every = argv[1:5]
        print(json.dumps(_child(mode, path, images, int(every), seed=0)))
        return {}
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="where the generated sets and the cache go (kept)")
    parser.add_argument("--images", type=int, default=118_287, help="COCO images (annotations scale with them)")
    parser.add_argument("--folder-images", type=int, default=1_281_167, help="files in the image-folder tree")
    parser.add_argument("--folder-classes", type=int, default=1000, help="class folders in the tree")
    parser.add_argument("--every", type=int, default=10_000, help="read the workers' memory every this many samples")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    report = benchmark(args)
    print("\n".join(markdown(report)))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
