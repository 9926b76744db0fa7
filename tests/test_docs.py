"""The documentation and the package metadata say what the code is.

Every public name is in the API reference; no warning of the documentation build is
silenced; user-facing text cites no issue numbers (readers cannot see the tracker); the
changelog follows Keep a Changelog and has a section for the version; the version is
written once; the README's table of supported versions is the pyproject's bounds.
"""

import importlib.metadata
import pathlib
import re
import tomllib

import pytest

import gam_optax

ROOT = pathlib.Path(__file__).parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def documented_names() -> set[str]:
    api = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    return set(re.findall(r"\.\. (?:auto(?:function|class|data)|py:class):: (\S+)", api))


def test_the_api_reference_lists_every_public_name():
    documented = documented_names()
    # flatness is documented whole (automodule :members:).
    missing = sorted(set(gam_optax.__all__) - {"flatness"} - documented)
    assert not missing, f"docs/api.md lacks {missing}"
    for deprecated in ("gam_hessian", "GAMHessianState"):
        assert deprecated in documented
    flax_names = {"gam_optax.flax.TrainState", "gam_optax.flax.nnx_loss_fn"}
    assert flax_names <= documented
    api = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    assert ".. automodule:: gam_optax.flatness\n   :members:" in api


def test_no_documentation_warning_is_silenced():
    conf = (ROOT / "docs" / "conf.py").read_text(encoding="utf-8")
    assert re.search(r"^suppress_warnings\b", conf, re.M) is None
    assert "nitpick_ignore" not in conf


def test_the_offline_inventories_are_well_formed():
    conf = (ROOT / "docs" / "conf.py").read_text(encoding="utf-8")
    for name in ("jax", "optax", "flax", "python"):
        assert f'"{name}": "https://' in conf
        lines = (ROOT / "docs" / "inventories" / f"{name}.txt").read_text().splitlines()
        entries = [line for line in lines if line.strip() and not line.startswith("#")]
        assert entries, name
        for entry in entries:
            assert re.fullmatch(r"[\w.]+ py:(class|function|data|method) 1 \S+ -", entry), entry


USER_FACING = [
    "README.md",
    "CHANGELOG.md",
    "experiments/RESULTS.md",
    *[str(p.relative_to(ROOT)) for p in sorted((ROOT / "docs").rglob("*.md"))],
    *[str(p.relative_to(ROOT)) for p in sorted((ROOT / "gam_optax").glob("*.py"))],
    *[str(p.relative_to(ROOT)) for p in sorted((ROOT / "experiments").rglob("*.py"))],
]
ISSUE_NUMBER = re.compile(r"\bissues?\s*#?\d+|(?<![\w&/])#\d+\b|\bissues/\d+", re.I)


@pytest.mark.parametrize("path", USER_FACING)
def test_user_facing_text_cites_no_issue_numbers(path):
    text = (ROOT / path).read_text(encoding="utf-8")
    found = [
        f"{path}:{i}: {line.strip()}"
        for i, line in enumerate(text.splitlines(), 1)
        if ISSUE_NUMBER.search(line)
    ]
    assert not found, "\n".join(found)


KEEP_A_CHANGELOG_TYPES = {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}


def test_the_changelog_keeps_a_changelog_with_a_section_for_the_version():
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert text.startswith("# Changelog\n")
    assert "https://keepachangelog.com/" in text
    versions = re.findall(r"^## \[([^\]]+)\](?: - (\S.*))?$", text, re.M)
    assert versions, "no ## [version] section"
    assert gam_optax.__version__ in [v for v, _ in versions]
    for version, date in versions:
        if version != "Unreleased":
            assert re.fullmatch(r"\d+\.\d+\.\d+", version), version
            assert date == "Unreleased" or re.fullmatch(r"\d{4}-\d{2}-\d{2}", date), date
    for heading in re.findall(r"^### (.*)$", text, re.M):
        assert heading in KEEP_A_CHANGELOG_TYPES, f"### {heading}: not a Keep a Changelog type"
    assert not re.search(r"^#### ", text, re.M)


def test_the_version_is_written_once():
    project = PYPROJECT["project"]
    assert "version" not in project and project["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "gam_optax.__version__"
    }
    assert re.fullmatch(r"\d+\.\d+\.\d+", gam_optax.__version__)
    try:
        installed = importlib.metadata.version("gam-optax")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("gam-optax is not installed (run from a checkout)")
    assert installed == gam_optax.__version__


def test_the_classifiers_name_the_tested_pythons_and_the_status():
    classifiers = PYPROJECT["project"]["classifiers"]
    assert any(c.startswith("Development Status :: ") for c in classifiers)
    pythons = [c.rsplit(" ", 1)[1] for c in classifiers if re.search(r"Python :: 3\.\d+$", c)]
    assert pythons and min(pythons, key=lambda v: int(v.split(".")[1])) == (
        PYPROJECT["project"]["requires-python"].removeprefix(">=")
    )


def _lower_bound(requirements: list[str], name: str) -> str:
    for requirement in requirements:
        match = re.fullmatch(rf"{name}>=([\d.]+)", requirement)
        if match:
            return match[1]
    raise AssertionError(f"no {name}>= bound in {requirements}")


def test_the_readme_table_of_supported_versions_is_the_pyproject_bounds():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| ([^|]+?) \| ([\d.]+) \| [\d.]+ \|$", readme, re.M))
    project = PYPROJECT["project"]
    assert rows["Python"] == project["requires-python"].removeprefix(">=")
    assert rows["jax, jaxlib"] == _lower_bound(project["dependencies"], "jax")
    assert rows["jax, jaxlib"] == _lower_bound(project["dependencies"], "jaxlib")
    assert rows["optax"] == _lower_bound(project["dependencies"], "optax")
    flax_extra = project["optional-dependencies"]["flax"]
    assert rows["flax (`gam-optax[flax]`)"] == _lower_bound(flax_extra, "flax")
    assert "gam-optax[flax]" in project["optional-dependencies"]["experiments"]
