"""The documentation and the package metadata say what the code is.

Every ```python block of the guides in ``docs/`` runs as pasted, in an empty namespace, and
does what its text says (as ``tests/test_readme.py`` checks the README's), or says on its
first line why no test machine runs it; each guide includes README sections that
exist; CI builds the site with the README's command in an environment holding only the
``docs`` extra; every public name is in the API reference; no warning of the documentation
build is silenced; the built site reads offline (no page loads a script, a stylesheet or an
image from the network: MathJax is the local copy under ``_static``) and no guide links to
itself; user-facing text cites no issue numbers (readers cannot see the tracker);
the changelog follows Keep a Changelog and has a section for the version; the version is
written once; the README's table of supported versions is the pyproject's bounds.
"""

import html.parser
import importlib.metadata
import pathlib
import re
import subprocess
import sys
import tomllib
import urllib.parse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import gam_optax
import gam_optax.flax

ROOT = pathlib.Path(__file__).parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
README = (ROOT / "README.md").read_text(encoding="utf-8")
GUIDES = sorted((ROOT / "docs").rglob("*.md"))
BLOCKS = [
    (path.relative_to(ROOT), text)
    for path in GUIDES
    for text in re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), re.S)
]


def block(marker: str) -> str:
    found = [text for _, text in BLOCKS if marker in text]
    assert len(found) == 1, f"expected one docs block containing {marker!r}, found {len(found)}"
    return found[0]


def run(marker: str) -> dict:
    """The block, as pasted: executed in an empty namespace, which it returns."""
    namespace = {}
    exec(block(marker), namespace)
    return namespace


def data(n=32, d=6, k=3):
    """A learnable problem: the label is the largest of the first k features."""
    x = jax.random.normal(jax.random.key(0), (n, d))
    return x, jnp.argmax(x[:, :k], axis=1)


def flatness_measures():
    """On a quadratic whose Hessian is known (2 xᵀx / n over every row): dataset_loss is the
    data set's mean, Lanczos gives λmax, Hutchinson's estimate is near the trace, R0 and R1
    lie within their bounds, and a measure repeats for its key."""
    namespace = run("from gam_optax import flatness")
    flatness, loss, params = namespace["flatness"], namespace["loss"], namespace["params"]
    x, y = namespace["batches"]["x"].reshape(-1, 3), namespace["batches"]["y"].reshape(-1)
    assert float(loss(params)) == pytest.approx(float(jnp.mean((x @ params["w"] - y) ** 2)))
    eigenvalues = np.linalg.eigvalsh(2 * np.asarray(x, np.float64).T @ np.asarray(x) / len(x))
    assert float(namespace["top"]) == pytest.approx(eigenvalues[-1], rel=1e-4)
    assert float(namespace["trace"]) == pytest.approx(eigenvalues.sum(), rel=0.1)  # 16 probes
    # The loss is quadratic: L(θ+δ) − L(θ) = g·δ + δᵀHδ/2 and ∇L(θ+δ) = g + Hδ, ‖δ‖ ≤ ρ; the
    # SAM step δ = ρ g/‖g‖ already gives ρ‖g‖ or more.
    rho, top, g = 0.05, eigenvalues[-1], float(optax.tree.norm(jax.grad(loss)(params)))
    assert rho * g * (1 - 1e-6) <= float(namespace["r0"]) <= rho * g + rho**2 * top / 2 + 1e-6
    assert rho * g * (1 - 1e-6) <= float(namespace["r1"]) <= rho * (g + rho * top) + 1e-6
    again = flatness.hessian_top_eigenvalue(loss, params, jax.random.key(0))
    assert float(again) == float(namespace["top"])


def clipping():
    """Both chains train; their first step is clipped (the gradient's norm is above 1)."""
    x, y = data()
    params = {"w": jnp.zeros((6, 3)), "b": jnp.zeros(3)}
    loss = lambda p: (
        10 * optax.softmax_cross_entropy_with_integer_labels(x @ p["w"] + p["b"], y).mean()
    )
    assert float(optax.tree.norm(jax.grad(loss)(params))) > 2.0
    namespace = run("gam_optax.every_gradient(")
    for name in ("clip_the_direction", "clip_every_gradient"):
        tx, p = namespace[name], params
        state = tx.init(p)
        step = jax.jit(lambda p, s, tx=tx: tx.update(jax.grad(loss)(p), s, p, loss_fn=loss))
        for i in range(20):
            updates, state = step(p, state)
            if i == 0:  # lr 0.1 along a direction of norm <= 1
                assert float(optax.tree.norm(updates)) <= 0.1 + 1e-6
            p = optax.apply_updates(p, updates)
        assert float(loss(p)) < 0.8 * float(loss(params))


def linen_batchnorm():
    """Linen with BatchNorm, as pasted: it trains, counts its steps, and a step keeps the
    batch statistics of your own pass alone (the extra passes' are discarded)."""
    namespace = run('mutable=["batch_stats"],')
    state, model, variables, batch = (
        namespace[k] for k in ("state", "model", "variables", "batch")
    )
    assert int(state.step) == 20
    fresh = gam_optax.flax.TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=namespace["tx"],
        batch_stats=variables["batch_stats"],
    )
    one, first_loss = namespace["train_step"](fresh, batch)  # the loss at the initial params
    assert float(namespace["loss"]) < 0.8 * float(first_loss)
    _, own = model.apply(variables, batch["image"], train=True, mutable=["batch_stats"])
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    jax.tree.map(close, one.batch_stats, own["batch_stats"])
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state.batch_stats,
                         variables["batch_stats"])  # fmt: skip
    assert min(jax.tree.leaves(moved)) > 1e-3


def nnx_recipe():
    """NNX, as pasted: the loss goes down, the step counter counts, and a step moves
    BatchNorm's statistics as your own pass alone does (the extra passes run on copies)."""
    namespace = run("self.bn = nnx.BatchNorm(")
    losses, model, optimizer = (namespace[k] for k in ("losses", "model", "optimizer"))
    assert losses[-1] < 0.8 * losses[0]
    assert int(optimizer.step[...]) == 20
    assert float(jnp.max(jnp.abs(model.bn.mean[...]))) > 1e-3  # from zeros
    fresh = namespace["Net"](nnx.Rngs(0))
    own = nnx.clone(fresh)
    own(namespace["x"])  # your pass alone, in training mode: BatchNorm's one update
    fresh_optimizer = nnx.Optimizer(fresh, namespace["tx"], wrt=nnx.Param)
    namespace["train_step"](fresh, fresh_optimizer, namespace["x"], namespace["y"])
    for name in ("mean", "var"):
        got, want = getattr(fresh.bn, name)[...], getattr(own.bn, name)[...]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def transparent():
    """Flax's own TrainState with transparent_gam, as pasted: 4 calls a step, ending at a
    step's end (so outer_params is the state's params), and it trains."""
    namespace = run("gam_optax.transparent_gam(")
    state, model, x, loss = (namespace[k] for k in ("state", "model", "x", "loss"))
    assert int(state.step) == 40 and int(gam_optax.transparent_phase(state.opt_state)) == 0
    jax.tree.map(np.testing.assert_array_equal, namespace["params"], state.params)
    first = model.init(jax.random.key(1), x)  # the block's initial params
    batch = namespace["batches"][0]
    assert float(loss(state.params, batch)) < 0.8 * float(loss(first, batch))


def one_device_gam_steps(loss, x, y, steps):
    """``steps`` GAM + SGD-momentum steps on one device, on the whole batch ``x, y``."""
    tx = optax.chain(gam_optax.gam(), optax.sgd(0.1, momentum=0.9))
    loss_fn = lambda p: loss(p, x, y)
    step = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p, loss_fn=loss_fn))
    params = {"w": jnp.zeros(x.shape[1], x.dtype)}
    state = tx.init(params)
    for _ in range(steps):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
    return params


def data_parallel():
    """As pasted, on the session's 4 devices (conftest.py): each device holds a quarter of
    the batch, and the shard_map step with average="gradients" is the one-device step on the
    whole batch, in float64 and in float32, within the rounding of sums in another order."""
    assert jax.device_count() == 4
    for dtype in (np.float64, np.float32):
        with jax.enable_x64(dtype == np.float64):
            namespace = run('average="gradients"),  #')
            x, y, loss, got = (namespace[k] for k in ("x", "y", "loss", "params"))
            assert namespace["mesh"].devices.size == 4
            assert {s.data.shape for s in x.addressable_shards} == {(16, 5)}
            assert got["w"].dtype == dtype
            x, y = jnp.asarray(np.asarray(x)), jnp.asarray(np.asarray(y))  # one device
            want = one_device_gam_steps(loss, x, y, 20)
            # 20 steps, each of sums over 64 rows taken in another order (4 shards of 16, then
            # the mean over devices): a sum of n terms rounds by about log2(n) eps
            tolerance = 20 * np.log2(64) * np.finfo(dtype).eps
            atol = tolerance * float(jnp.max(jnp.abs(want["w"])))
            np.testing.assert_allclose(got["w"], want["w"], rtol=tolerance, atol=atol)
            assert float(loss(got, x, y)) < 0.2 * float(loss({"w": jnp.zeros(5)}, x, y))


def kernels_split_as_annotated(model, state):
    """Each kernel, and each state leaf of a kernel's shape, is split as annotated."""
    expected = {(16, 64): P("data", "model"), (64, 4): P("model", "data")}
    leaves = [x for x in jax.tree.leaves(state) if getattr(x, "shape", None) in expected]
    assert len(leaves) >= 2, "the optimizer's state holds no copy of the kernels"
    for x in [*model, *leaves]:
        assert x.sharding.spec == expected[x.shape], (x.shape, x.sharding)


def nnx_sharded():
    """As pasted: kernels and optimizer state split as annotated (FSDP x TP); it trains."""
    namespace = run("nnx.with_partitioning(")
    model, optimizer, losses = (namespace[k] for k in ("model", "optimizer", "losses"))
    kernels_split_as_annotated([model.up.kernel[...], model.down.kernel[...]], optimizer)
    assert model.up.kernel[...].sharding.mesh.shape == namespace["mesh"].shape
    assert losses[-1] < 0.5 * losses[0]


def linen_sharded():
    """As pasted: TrainState's params and opt_state split as annotated; it trains."""
    namespace = run("nn.get_sharding(")
    state, x, y = (namespace[k] for k in ("state", "x", "y"))
    params = nn.meta.unbox(state.params)
    kernels_split_as_annotated([params["Dense_0"]["kernel"], params["Dense_1"]["kernel"]], state)
    first = namespace["create_state"](jax.random.key(0), x)
    logits = lambda s: namespace["model"].apply({"params": s.params}, x)
    loss = lambda s: optax.softmax_cross_entropy_with_integer_labels(logits(s), y).mean()
    assert int(state.step) == 30 and float(loss(state)) < 0.5 * float(loss(first))


def explicit_fsdp():
    """As pasted on an Explicit mesh: params and GAM's state keep their split; it trains."""
    namespace = run("AxisType.Explicit")
    params, state, losses = (namespace[k] for k in ("params", "state", "losses"))
    for x in [*jax.tree.leaves(params), *jax.tree.leaves(state)]:
        if x.ndim == 2:
            assert jax.typeof(x).sharding.spec == P("data", None), jax.typeof(x)
    assert losses[-1] < 0.5 * losses[0]


def equinox_recipe():
    """As pasted: an Equinox MLP split by eqx.partition trains with GAM; the filter style
    instead fails with the error that names partition and combine."""
    eqx = pytest.importorskip("equinox")
    namespace = run("eqx.partition(model, eqx.is_array)  #")
    losses, model = namespace["losses"], namespace["model"]
    assert losses[-1] < 0.2 * losses[0]
    assert isinstance(model, eqx.nn.MLP)
    x, y, tx = namespace["x"], namespace["y"], namespace["tx"]
    filtered = eqx.filter(model, eqx.is_array)
    grads = eqx.filter_grad(lambda m: namespace["loss"](m, x, y))(filtered)
    with pytest.raises(TypeError, match=r"eqx.partition\(model, eqx.is_array\)"):
        loss_fn = lambda m: jnp.mean((jax.vmap(m)(x) - y) ** 2)
        tx.update(grads, tx.init(filtered), filtered, loss_fn=loss_fn)


def m_sharpness():
    """As pasted: the vmap step trains; its direction, and the sequential way's, is the mean
    of the micro-batches' own directions."""
    namespace = run('axis_name="micro")  #')
    params, loss, x, y = (namespace[k] for k in ("params", "loss", "x", "y"))
    assert float(loss(params, x, y)) < 0.2 * float(loss({"w": jnp.zeros(5)}, x, y))
    plain = gam_optax.gam()
    own = []
    for s in range(0, 128, 16):
        loss_fn = lambda p, s=s: loss(p, x[s : s + 16], y[s : s + 16])
        own.append(
            plain.update(jax.grad(loss_fn)(params), plain.init(params), params, loss_fn=loss_fn)[0][
                "w"
            ]
        )
    d = jax.vmap(namespace["direction"], in_axes=(None, 0, 0), axis_name="micro")(
        params, x.reshape(8, 16, 5), y.reshape(8, 16)
    )
    # float32, the same formula batched or not: the sums' orders differ, tens of roundings
    np.testing.assert_allclose(d["w"][3], sum(own) / 8, rtol=1e-5, atol=1e-6)
    sequential = namespace["mean_direction"](params, x, y, sequential=True)
    np.testing.assert_allclose(sequential["w"], sum(own) / 8, rtol=1e-5, atol=1e-6)


RUNS = {
    'axis_name="micro")  #': m_sharpness,
    "eqx.partition(model, eqx.is_array)  #": equinox_recipe,
    "nnx.with_partitioning(": nnx_sharded,
    "nn.get_sharding(": linen_sharded,
    "AxisType.Explicit": explicit_fsdp,
    "from gam_optax import flatness": flatness_measures,
    "gam_optax.every_gradient(": clipping,
    'mutable=["batch_stats"],': linen_batchnorm,
    "self.bn = nnx.BatchNorm(": nnx_recipe,
    "gam_optax.transparent_gam(": transparent,
    'average="gradients"),  #': data_parallel,
}
NOT_RUN = re.compile(r"# not run: needs (.+)")
UNRUNNABLE = ("a GPU", "a TPU", "several hosts", "a downloaded data set")  # CI has none
MAX_NOT_RUN = 2


def not_run_reason(text: str) -> str | None:
    """What a block's first line ``# not run: needs ...`` says it needs, or None; the need
    must be one that no test machine has."""
    mark = NOT_RUN.fullmatch(text.splitlines()[0])
    if mark is None:
        return None
    assert any(need in mark[1] for need in UNRUNNABLE), f"not a reason to skip a block: {mark[0]}"
    return mark[1]


def test_a_block_marked_not_run_names_what_no_test_machine_has():
    assert not_run_reason("import jax\n# not run: needs a GPU\n") is None  # first line only
    assert not_run_reason("# not run: needs a GPU (bfloat16)\nimport jax\n") == "a GPU (bfloat16)"
    with pytest.raises(AssertionError, match="not a reason"):
        not_run_reason("# not run: needs time\n")


def test_every_docs_block_is_run_by_a_test_or_says_why_not():
    assert BLOCKS, "no ```python block in docs/"
    not_run = []
    for path, text in BLOCKS:
        owners = [marker for marker in RUNS if marker in text]
        if not_run_reason(text):
            assert not owners, f"{path}: a block marked not run is run by {owners}"
            not_run.append(f"{path}: {text.splitlines()[0]}")
        else:
            assert len(owners) == 1, f"{path}: block without exactly one test:\n{text[:300]}"
    assert len(not_run) <= MAX_NOT_RUN, f"the guides should show runnable code: {not_run}"
    # the guides that show the library in use show code that runs
    shown = {path.name for path, text in BLOCKS if not not_run_reason(text)}
    assert {"family.md", "flax.md", "data_parallel.md", "scaling.md"} <= shown


@pytest.mark.parametrize("marker", list(RUNS))
def test_docs_block_runs_as_pasted_and_does_what_it_says(marker):
    RUNS[marker]()


def test_each_guide_includes_readme_sections_that_exist_in_order():
    headings = re.findall(r"^#+ .+$", re.sub(r"^```.*?^```", "", README, flags=re.S | re.M), re.M)
    included = set()
    for path in GUIDES:
        text = path.read_text(encoding="utf-8")
        for start, end in re.findall(
            r"```\{include\} [./]*README\.md\n:start-after: \"(.+)\"\n:end-before: \"(.+)\"", text
        ):
            assert start in headings and end in headings, f"{path.name}: {start} .. {end}"
            assert headings.index(start) < headings.index(end), path.name
            included.add(start)
    # the front page (the intro and the quick start) and a guide per user-facing section
    sections = ["Install", "Use in a chain", "With Flax", "Data parallel", "Performance"]
    assert included == {"# gam-optax", *(f"## {s}" for s in [*sections, "The experiments"])}


def test_ci_runs_the_readme_test_command():
    (command,) = re.findall(r'^pip install -e "\.\[test\]" && (python -m pytest.*)$', README, re.M)
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert command in [line.strip() for line in ci.splitlines()], command


def test_ci_builds_the_docs_with_the_readme_command_in_a_docs_only_environment():
    (command,) = re.findall(r"^pip install -e \"\.\[docs\]\" && sphinx-build .*$", README, re.M)
    assert "-W" in command.split()  # warnings are errors
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    lines = [line.strip() for line in ci.splitlines()]
    assert command in lines, ".ci/run must run the README's docs command as written"
    # ... in a subshell that activates a virtual environment of its own, into which nothing
    # but pip itself is installed before it, and before the test environment exists
    at = lines.index(command)
    opening = max(i for i in range(at) if lines[i] == "(")
    subshell = lines[opening + 1 : at]
    (activate,) = [line for line in subshell if line.startswith("source ")]
    venv = re.fullmatch(r'source "\$(\w+)/bin/activate"', activate)[1]
    assert f'python3 -m venv "${venv}"' in lines[:opening]
    installs = [line for line in subshell if "pip install" in line]
    assert installs == ["python -m pip install --quiet --upgrade pip"]
    assert lines[at + 1] == ")"
    assert at < lines.index('python -m pip install --quiet -e ".[test]"')
    docs_extra = PYPROJECT["project"]["optional-dependencies"]["docs"]
    assert "gam-optax[flax]" in docs_extra  # autodoc imports gam_optax.flax
    for package in ("sphinx", "myst-nb", "furo"):
        assert any(r.startswith(f"{package}>=") for r in docs_extra), package


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


@pytest.fixture(scope="session")
def site(tmp_path_factory):
    """The HTML site, built once for the tests that read it, as the README's command builds
    it (warnings are errors)."""
    out = tmp_path_factory.mktemp("site")
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
    command += ["-d", str(out / "doctrees"), str(ROOT / "docs"), str(out / "html")]
    build = subprocess.run(command, capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr
    return out / "html"


class _Page(html.parser.HTMLParser):
    """A built page's resources (what the browser fetches: scripts, stylesheets, images,
    frames) and the links of its article (the page's text, not the theme's navigation)."""

    def __init__(self):
        super().__init__()
        self.resources, self.links, self.sections, self._article = [], [], [], 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "article":
            self._article += 1
        for name in ("src", "data", "poster"):
            if attrs.get(name):
                self.resources.append((tag, attrs[name]))
        if attrs.get("srcset"):
            self.resources += [(tag, c.split()[0]) for c in attrs["srcset"].split(",") if c]
        if tag == "link" and attrs.get("href"):
            self.resources.append((tag, attrs["href"]))
        for url in re.findall(r"url\(\s*['\"]?([^'\")\s]+)", attrs.get("style") or ""):
            self.resources.append((tag, url))
        if self._article and tag == "section" and attrs.get("id"):
            self.sections.append(attrs["id"])
        if self._article and tag == "a" and "href" in attrs:
            if "headerlink" not in (attrs.get("class") or ""):  # a heading's own anchor
                self.links.append(attrs["href"] or "")

    def handle_endtag(self, tag):
        if tag == "article":
            self._article -= 1


def _parse(path: pathlib.Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _remote(url: str) -> bool:
    """An absolute or protocol-relative address; ``data:`` and relative paths are local."""
    return bool(re.match(r"\s*([a-z][a-z0-9+.-]*:)?//", url, re.I))


def test_the_site_loads_nothing_from_the_network_and_mathjax_is_local(site):
    pages = sorted(site.rglob("*.html"))
    assert len(pages) > 10, pages
    remote = [
        f"{page.relative_to(site)}: <{tag}> {url}"
        for page in pages
        for tag, url in _parse(page).resources
        if _remote(url)
    ]
    assert not remote, "pages load from the network:\n" + "\n".join(remote)
    imports = [
        f"{css.relative_to(site)}: {found}"
        for css in sorted((site / "_static").rglob("*.css"))
        for found in re.findall(
            r"(?:url\(|@import)\s*['\"]?(?:https?:)?//[^'\")\s]*", css.read_text("utf-8")
        )
    ]
    assert not imports, "stylesheets load from the network:\n" + "\n".join(imports)
    # The maths: the API reference's is typeset by the MathJax copied into the site.
    api = site / "api.html"
    assert r"\(g_0 = \nabla L(\theta)\)" in api.read_text(encoding="utf-8")
    scripts = [url for tag, url in _parse(api).resources if tag == "script"]
    (mathjax,) = [url for url in scripts if "mathjax" in url.lower()]
    assert mathjax.startswith("_static/mathjax/"), mathjax
    assert (site / mathjax.split("?")[0]).is_file(), mathjax
    assert list((site / "_static" / "mathjax" / "output" / "chtml" / "fonts").rglob("*.woff"))
    docs_extra = PYPROJECT["project"]["optional-dependencies"]["docs"]
    assert any(r.startswith("sphinx-mathjax-offline>=") for r in docs_extra)


def test_no_guide_links_to_itself(site):
    """A guide's link to its own page (or to its top) leads nowhere: the README's pointer to
    a guide, included in that guide, leads to the section it means (docs/conf.py)."""
    guides = sorted((site / "guides").glob("*.html"))
    assert {g.stem for g in guides} == {g.stem for g in (ROOT / "docs" / "guides").glob("*.md")}
    found = []
    for guide in guides:
        page = _parse(guide)
        assert page.links and page.sections, guide.name
        own = f"guides/{guide.name}"
        for href in page.links:
            url = urllib.parse.urlsplit(urllib.parse.urljoin(own, href))
            if url.scheme or url.netloc or url.path not in ("", own):
                continue
            if url.fragment in ("", page.sections[0]):
                found.append(f"{guide.name}: {href!r}")
    assert not found, "guides link to themselves:\n" + "\n".join(found)


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
