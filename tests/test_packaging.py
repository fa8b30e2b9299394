"""The installable package: the wheel carries every config, the console script is declared and reads the packaged
configs, a registered attention without its defaults file is an error, optional dependencies fail with the extra to
install, docs/benchmarks.md shows a figure for every table. (``.ci/wheel`` installs the wheel into a clean venv and
trains with it; that is too slow for this suite.)"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from attnzoo.extras import EXTRAS, require
from attnzoo.layers import list_attention
from attnzoo.training.run import ConfigError, attention_defaults

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

run_module = importlib.import_module("attnzoo.training.run")  # the package re-exports run(), which hides it
REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# what a wheel is built from: the package folders mapped in pyproject, plus the files the metadata reads
SOURCES = sorted({path.split("/")[0] for path in PYPROJECT["tool"]["setuptools"]["package-dir"].values()})


def _config_yamls(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*.yaml") if p.relative_to(root).parts[0] != "local"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (building in the checkout would leave build/ there)."""
    src = tmp_path_factory.mktemp("src")
    for name in ["pyproject.toml", "README.md"]:
        shutil.copy(REPO / name, src / name)
    for name in SOURCES:
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "local"))
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = out.glob("attnzoo-*.whl")
    return path


def test_wheel_ships_every_config_yaml_and_the_console_script(wheel):
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entry_points = whl.read(entry_points).decode()
    shipped = {
        n.removeprefix("attnzoo/configs/") for n in names if n.startswith("attnzoo/configs/") and n.endswith(".yaml")
    }
    expected = _config_yamls(REPO / "configs")
    assert len(expected) > 30 and shipped == expected
    assert "attnzoo/layers/__init__.py" in names and "attnzoo/kernels/gla/chunked.py" in names
    assert "[console_scripts]" in entry_points and "attnzoo-train = attnzoo.cli:train" in entry_points


def test_console_script_is_declared_and_resolves():
    target = PYPROJECT["project"]["scripts"]["attnzoo-train"]
    module, _, function = target.partition(":")
    assert callable(getattr(importlib.import_module(module), function))


def test_package_configs_compose_without_the_checkout():
    """The console script's config source, pkg://attnzoo.configs, holds the whole train config."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(version_base="1.3", config_module="attnzoo.configs"):
            cfg = compose(config_name="train", overrides=["attention=gla"])
    finally:
        GlobalHydra.instance().clear()
    assert cfg.attention.name == "gla" and cfg.model.name == "gpt" and cfg.tune_malloc is False


def test_package_data_globs_cover_every_config_folder():
    """Each configs/ subfolder holds only yaml files, and the package-data globs take both levels."""
    globs = PYPROJECT["tool"]["setuptools"]["package-data"]["attnzoo.configs"]
    assert "*.yaml" in globs and "**/*.yaml" in globs
    stray = [
        p.relative_to(REPO).as_posix()
        for p in (REPO / "configs").rglob("*")
        if p.is_file() and p.suffix not in (".yaml", ".py", ".pyc") and "local" not in p.parts
    ]
    assert not stray, f"files under configs/ that the wheel would not ship: {stray}"


def test_every_registered_attention_has_defaults():
    for name in list_attention():
        spec = attention_defaults(name)
        assert spec["name"] == name


def test_missing_attention_yaml_is_an_error_naming_the_file(tmp_path, monkeypatch):
    (tmp_path / "attention").mkdir()
    monkeypatch.setattr(run_module, "CONFIG_DIR", tmp_path)
    expected = tmp_path / "attention" / "gla.yaml"
    with pytest.raises(ConfigError, match="registered but its defaults file") as err:
        attention_defaults("gla")
    assert str(expected) in str(err.value) and "Add it" in str(err.value)
    # the same error through a per-layer list, the path that used to drop every default silently
    with pytest.raises(ConfigError, match=r"gla\.yaml"):
        run_module._resolve_entry({"name": "gla", "expand_k": 0.5}, defaults_from_yaml=True)


def test_unknown_attention_is_an_error_with_the_valid_names():
    with pytest.raises(ConfigError, match="Did you mean 'softmax'"):
        attention_defaults("sofmax")


@pytest.mark.parametrize("module,extra", [("sklearn.datasets", "vision"), ("matplotlib", "plot")])
def test_missing_optional_dependency_names_the_extra(monkeypatch, module, extra):
    for name in {module, module.partition(".")[0]}:
        monkeypatch.setitem(sys.modules, name, None)  # import of a None entry fails as if not installed
    with pytest.raises(ModuleNotFoundError, match=rf"this feature needs .*pip install 'attnzoo\[{extra}\]'"):
        require(module, "this feature")


def test_optional_dependency_present_is_returned_and_unknown_one_refused():
    assert require("matplotlib", "plots").__name__ == "matplotlib"
    with pytest.raises(ValueError, match="not an optional dependency"):
        require("numpy", "anything")


def test_every_extra_named_by_require_exists():
    extras = PYPROJECT["project"]["optional-dependencies"]
    for package, extra in EXTRAS.values():
        declared = " ".join(extras[extra]).lower()
        assert package in declared or f"attnzoo[{extra}" in declared, (package, extra)


def test_benchmark_doc_has_a_figure_per_table_and_every_figure_exists():
    doc = (REPO / "docs" / "benchmarks.md").read_text()
    for section in doc.split("\n## ")[1:]:
        tables = section.count("\n|---")
        images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", section)
        assert len(images) >= tables, f"section {section.splitlines()[0]!r}: {tables} tables, {len(images)} figures"
    for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", doc):
        assert (REPO / "docs" / target).is_file(), f"docs/benchmarks.md shows {target}, which does not exist"


def test_plot_script_finds_every_table_it_draws():
    """scripts/plot_benchmarks.py reads its tables from docs/benchmarks.md: each is still there, with its columns."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        plot_benchmarks = importlib.import_module("plot_benchmarks")
    finally:
        sys.path.remove(str(REPO / "scripts"))
    text = plot_benchmarks.DOC.read_text()
    for figure in plot_benchmarks.FIGURES:
        rows = plot_benchmarks.section_tables(text, figure.section)[figure.table]
        assert rows and all(column in rows[0] for column in (*figure.labels, *figure.values)), figure.name
        assert all(plot_benchmarks.number(row[column]) > 0 for row in rows for column in figure.values)
