"""The wheel must carry every sub-package: pyproject lists them explicitly (pipelines/, cli/ and
configs/ are mapped into neuro_ood), so a new folder that is not listed would be missing from a
non-editable install."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    mapped = {name: ROOT / folder for name, folder in config["package-dir"].items()}
    found = set()
    for name, folder in mapped.items():
        for init in folder.rglob("__init__.py"):
            parts = init.parent.relative_to(folder).parts
            found.add(".".join([name, *parts]) if parts else name)
    assert found <= listed, f"not in pyproject packages: {sorted(found - listed)}"
    assert "*.yaml" in config["package-data"]["neuro_ood.configs"]


def test_the_report_template_ships_with_the_pipelines():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "*.html" in config["package-data"]["neuro_ood.pipelines"]
    assert (ROOT / "pipelines" / "report_template.html").is_file()
