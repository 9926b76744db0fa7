"""Print pip constraints that pin the library's requirements to their declared lower bounds.

Reads pyproject.toml: every requirement of ``dependencies`` and of the extras named on the
command line (e.g. ``flax``) must carry a ``>=`` bound; each becomes ``name==bound``. CI
installs ``-e .[flax]`` under these constraints to test the lowest versions the package
declares (pip's own resolver picks the newest versions of everything else).
"""

import pathlib
import re
import sys
import tomllib

project = tomllib.loads(
    (pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8")
)["project"]
requirements = list(project["dependencies"])
for extra in sys.argv[1:]:
    requirements += project["optional-dependencies"][extra]
for requirement in requirements:
    if requirement.startswith("gam-optax"):
        continue
    match = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][0-9.]*)", requirement.split(";")[0])
    if match is None:
        sys.exit(f"lowest_constraints: {requirement!r} has no plain >= lower bound")
    print(f"{match[1]}=={match[2]}")
