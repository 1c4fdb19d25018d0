"""The project as a user installs it: a wheel (not an editable checkout) holds every file the code opens and converts.

The wheel is built once (``pip wheel``; its build backend setuptools comes from PyPI) and installed
with ``pip install --target``; the installed copy then runs in a fresh Python whose working
directory is outside the repository, so nothing can be read from the checkout by accident.
"""

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import BertModel

from tests.conftest import tiny_bert_config

REPO = Path(__file__).resolve().parents[1]


SOURCES = ("pyproject.toml", "README.md", "hf_performer", "model_cards")
"""What the build reads; copied so the build's own ``build/`` and ``*.egg-info`` stay out of the checkout."""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source, folder = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--disable-pip-version-check", "-w", folder, source],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel_file,) = folder.glob("hf_performer-*.whl")
    return wheel_file


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--disable-pip-version-check",
         "--target", target, wheel],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return target


def test_wheel_holds_every_module_and_the_card_template(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {path.relative_to(REPO).as_posix() for path in (REPO / "hf_performer").rglob("*.py")}
    assert modules - names == set()
    assert "hf_performer/model_cards/performer.md" in names


INSTALLED_SCRIPT = textwrap.dedent(
    """
    import subprocess, sys
    src, out = sys.argv[1], sys.argv[2]
    convert = [sys.executable, "-m", "hf_performer.cli", "convert", src, out, "--nb-features", "8"]
    subprocess.run(convert, check=True)

    import hf_performer
    from transformers import AutoModel
    print("package:", hf_performer.__file__)
    converted = AutoModel.from_pretrained(out)
    on_load = AutoModel.from_pretrained(src, attention="favor+")
    print("classes:", type(converted).__name__, type(on_load).__name__)
    print("card:", "trust_remote_code=True" in open(out + "/README.md").read())
    """
)


def test_installed_wheel_converts_and_loads_outside_the_checkout(installed, tmp_path):
    torch.manual_seed(0)
    BertModel(tiny_bert_config()).save_pretrained(tmp_path / "src")
    (tmp_path / "check.py").write_text(INSTALLED_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=str(installed), HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, str(tmp_path / "check.py"), str(tmp_path / "src"), str(tmp_path / "out")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line)
    assert Path(lines["package"]).is_relative_to(installed)
    assert lines["classes"] == "PerformerBertModel PerformerBertModel"
    assert lines["card"] == "True"


def test_nothing_that_runs_reads_the_development_folder_beside_the_checkout():
    """A user's clone has no development folder beside it: the package, the tests, CI and the README's commands
    never use it (the name is split here so that repository-wide searches for it do not match this test)."""
    folder = "sh" "ared"
    patterns = (f"../{folder}", f'"{folder}"')
    runs = [*(REPO / "hf_performer").rglob("*.py"), *(REPO / "tests").glob("*.py"), *(REPO / ".ci").iterdir()]
    runs += [REPO / "README.md", REPO / "pyproject.toml"]
    readers = [
        path.relative_to(REPO).as_posix()
        for path in runs
        if path != Path(__file__) and any(pattern in path.read_text() for pattern in patterns)
    ]
    assert readers == []
