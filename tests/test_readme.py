"""Every Python snippet of README.md runs as written, so the README cannot drift from the code.

Weight tags are served from the torch hub cache, where a download would put them: each tag a snippet names
gets a file of seeded random weights of its architecture, saved under the tag's file name (nothing is
downloaded). A line whose comment is a Python literal (`list_backbones("resnet5*")  # ['resnet50', ...]`)
must evaluate to it.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backbones import create_model
from backbones.weights_table import WEIGHTS

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def with_checked_comments(code: str) -> str:
    """Adds `assert (expr) == literal` after each statement line whose trailing comment is a literal."""
    lines = []
    for line in code.splitlines():
        lines.append(line)
        statement, hash_, comment = line.partition("  # ")
        if not hash_ or statement.startswith((" ", "@", "def ", "class ")):
            continue
        try:
            expected = ast.literal_eval(comment.strip())
            ast.parse(statement.strip(), mode="eval")
        except (SyntaxError, ValueError):
            continue
        if isinstance(expected, (list, tuple, int, float, str)):
            lines.append(f"assert ({statement.strip()}) == {expected!r}, ({statement.strip()})")
    return "\n".join(lines)


def stage_weights(code: str, torch_home: Path) -> None:
    """Seeded random weights for every tag the snippet names, in the hub cache under the tag's file name."""
    checkpoints = torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    for tag in sorted(set(re.findall(r"[\"']([\w.]+)[\"']", code)) & set(WEIGHTS)):
        spec = WEIGHTS[tag]
        torch.manual_seed(0)
        model = create_model(tag.split(".", 1)[0], num_classes=spec.num_classes)
        torch.save(model.state_dict(), checkpoints / spec.file_name)


def test_readme_has_snippets():
    assert SNIPPETS, "README.md has no ```python blocks"


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index, tmp_path):
    code = with_checked_comments(SNIPPETS[index])
    stage_weights(code, tmp_path / "torch")
    env = {"TORCH_HOME": str(tmp_path / "torch"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=README.parent, env=env, timeout=300
    )
    assert result.returncode == 0, f"README snippet {index} failed:\n{SNIPPETS[index]}\n{result.stderr[-3000:]}"


def test_checked_comments_catch_a_wrong_claim():
    code = with_checked_comments("x = [1, 2]\nsorted(x)  # [2, 1]\n")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode != 0


def test_readme_links_and_images_name_files_that_exist():
    """`[text](path)` and `![alt](image.png)` to a file of the repository: the file is committed beside it."""
    root = README.parent
    targets = re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", README.read_text())
    local = [t for t in targets if "://" not in t]
    assert "report_example.png" in local
    missing = [t for t in local if not (root / t).is_file()]
    assert not missing, f"README links to files that do not exist: {missing}"
