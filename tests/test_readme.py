"""Every ```python block of the README runs as pasted, and does what the text around it says.

Each block is recognised by a line it contains and runs in an empty namespace (``run``):
its imports, data and model are its own. The test then checks the block's claims. A new
block must get an entry in ``RUNS`` (or in another test, named in ``ELSEWHERE``), or, if no
test machine can run it, a first line ``# not run: needs ...`` naming what it needs (a GPU,
a TPU, several hosts, a downloaded data set): the first test fails until it has one. The
README is for users: at most 300 lines, its sections in a reader's order, its first
screen's commands and the family's table as promised, and every local link alive. The
guides' blocks in ``docs/`` are run by ``tests/test_docs.py``.
"""

import contextlib
import functools
import io
import pathlib
import re
import tomllib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gam_optax

ROOT = pathlib.Path(__file__).parents[1]
README = ROOT / "README.md"
TEXT = README.read_text(encoding="utf-8")
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, re.S)


def block(marker: str) -> str:
    found = [b for b in BLOCKS if marker in b]
    assert len(found) == 1, f"expected one README block containing {marker!r}, found {len(found)}"
    return found[0]


def run(marker: str) -> dict:
    """The block, as pasted: executed in an empty namespace, which it returns."""
    namespace = {}
    exec(block(marker), namespace)
    return namespace


def quick_start():
    """The quick start, exactly as written and with nothing defined beforehand: it prints the
    loss before and after, and 100 GAM steps fit the linear model to the noise's level."""
    text = block("def train_step(params, state, batch):")
    assert text == BLOCKS[0], "the quick start is the README's first Python block"
    namespace, printed = {}, io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(text, namespace)
    before, after = (
        float(v) for v in re.findall(r"loss (?:before|after): +([\d.]+)", printed.getvalue())
    )
    assert before > 10 and after < 0.02, printed.getvalue()
    assert float(namespace["loss"](namespace["params"], (namespace["x"], namespace["y"]))) < 0.02
    true_w = np.array([1.0, -2.0, 3.0, 0.5, 0.0])
    np.testing.assert_allclose(np.asarray(namespace["params"]["w"]), true_w, atol=0.05)


def use_in_a_chain():
    """The chain descends with loss_fn; sam_gam with sam_rho == hvp_step evaluates 3
    gradients per update beyond g0 (the table's 4)."""
    tx = run("sam_rho=")["tx"]
    x = jax.random.normal(jax.random.key(0), (32, 4))
    y = x @ np.array([1.0, -1.0, 0.5, 2.0])
    calls = []

    def loss(params):
        calls.append(1)  # inline mode traces the loss once per gradient evaluation
        return ((x @ params - y) ** 2).mean()

    params = jnp.zeros(4)
    state = tx.init(params)
    before = float(loss(params))
    for step in range(5):
        calls.clear()
        updates, state = tx.update(jax.grad(loss)(params), state, params, loss_fn=loss)
        assert len(calls) == 1 + 3, step  # g0 here, then g1, g2, g3 inside
        params = optax.apply_updates(params, updates)
    assert float(loss(params)) < 0.5 * before


def linen():
    """Linen, as pasted: loss_fn forwarded, 20 steps counted, the loss goes down."""
    namespace = run("gam_optax.flax.TrainState.create(")
    state, model, x, y = (namespace[k] for k in ("state", "model", "x", "y"))
    loss = lambda params: optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": params}, x), y
    ).mean()
    assert int(state.step) == 20
    assert float(loss(state.params)) < 0.8 * float(loss(namespace["params"]))
    assert float(namespace["loss"]) < 0.8 * float(loss(namespace["params"]))


RUNS = {
    "def train_step(params, state, batch):": quick_start,
    "sam_rho=": use_in_a_chain,  # also tests/library/test_sam_gam.py
    "gam_optax.flax.TrainState.create(": linen,
}
ELSEWHERE = {  # run there, as pasted, in an empty namespace
    "CPU_OPTIONS": "tests/library/test_performance.py",
    "def max_pool_2x2": "tests/library/test_performance.py",
}
NOT_RUN = re.compile(r"# not run: needs (.+)")  # as in tests/test_docs.py
UNRUNNABLE = ("a GPU", "a TPU", "several hosts", "a downloaded data set")  # CI has none
MAX_NOT_RUN = 1


def test_every_readme_block_is_run_by_a_test_or_says_why_not():
    markers, not_run = [*RUNS, *ELSEWHERE], []
    for text in BLOCKS:
        owners = [m for m in markers if m in text]
        mark = NOT_RUN.fullmatch(text.splitlines()[0])
        if mark:
            assert not owners, f"a block marked not run is run by {owners}:\n{text[:300]}"
            assert any(need in mark[1] for need in UNRUNNABLE), mark[0]
            not_run.append(mark[0])
        else:
            assert len(owners) == 1, f"README block without exactly one test:\n{text[:300]}"
    assert len(not_run) <= MAX_NOT_RUN, f"the README should show runnable code: {not_run}"


@pytest.mark.parametrize("marker", list(RUNS))
def test_readme_block_runs_as_pasted_and_does_what_it_says(marker):
    RUNS[marker]()


# ----------------------------------------------------------------------------
# The README as a whole: short, in a reader's order, its promises kept.
# ----------------------------------------------------------------------------

SECTIONS = [  # a reader's order: try it, install it, use it, scale it, the experiments
    "Quick start",
    "Install",
    "Use in a chain",
    "With Flax",
    "Data parallel",
    "Performance",
    "The experiments",
    "Documentation",
    "Citing GAM",
]
FIRST_SCREEN = [
    'pip install -e ".[experiments]" && python -m experiments',
    'pip install -e ".[test]" && python -m pytest',
]


def outside_code(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def test_the_readme_is_short_and_in_a_readers_order():
    assert len(TEXT.splitlines()) <= 300, "the README is for users: move details to docs/"
    assert re.findall(r"^## (.+)$", outside_code(TEXT), re.M) == SECTIONS
    # the first screen: the two commands come before the first section
    first_screen = TEXT.split("\n## ", 1)[0]
    for command in FIRST_SCREEN:
        assert command in first_screen.splitlines()
    # contributor material lives in CONTRIBUTING.md
    contributing = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    for internal in ("Adding a perturbation", "mutmut", "_frame.py", "pytest-xdist"):
        assert internal not in TEXT and internal in contributing, internal


def _modes_rows():
    """The README's members x modes table: (member expression, gradients, transparent)."""
    chain = TEXT.split("## Use in a chain", 1)[1].split("\n## ", 1)[0]
    table = chain.split("### The family and its modes\n\n", 1)[1].split("\n\n", 1)[0]
    for line in table.splitlines()[2:]:
        member, gradients, inline, scanned, transparent, micro = line.strip("|").split(" | ")
        assert (inline.strip(), scanned.strip(), micro.strip()) == ("yes",) * 3, line
        yield re.search(r"`([^`]+)`", member).group(1), gradients.strip(), transparent.strip()


def _build(expression, axis_name=None):
    """The member a row names, with example values for its hyperparameters (and
    ``axis_name=`` if given)."""
    code = expression.replace("..., ", "").replace("(...)", "()")
    if axis_name is not None:
        code = code[:-1] + ("" if code.endswith("()") else ", ") + f"axis_name={axis_name!r})"
    values = dict(rho=0.1, alpha=0.2, penalty=0.5, sam_rho=0.05, r=0.02)
    return eval(f"gam_optax.{code}", {"gam_optax": gam_optax, **values})


def test_every_row_of_the_modes_table_takes_m_sharpness_steps_under_vmap(x64):
    """The table's m-sharpness column: each member, built with ``axis_name``, under
    ``jax.vmap`` over 3 micro-batches, gives the mean of the micro-batches' own directions."""
    x = jax.random.normal(jax.random.key(0), (12, 3))
    y = jnp.sin(x @ jnp.array([1.0, -2.0, 0.5]))
    params = {"w": jnp.array([0.3, -0.2, 0.1])}
    loss = lambda p, x, y: jnp.mean((jnp.tanh(x @ p["w"]) - y) ** 2)

    def direction(member, x, y):
        loss_fn = lambda p: loss(p, x, y)
        g0 = jax.grad(loss_fn)(params)
        return member.update(g0, member.init(params), params, loss_fn=loss_fn)[0]["w"]

    for expression, _, _ in _modes_rows():
        member, averaged = _build(expression), _build(expression, "micro")
        xs, ys = x.reshape(3, 4, 3), y.reshape(3, 4)
        got = jax.vmap(functools.partial(direction, averaged), axis_name="micro")(xs, ys)
        want = sum(direction(member, xs[i], ys[i]) for i in range(3)) / 3
        np.testing.assert_allclose(got, jnp.broadcast_to(want, got.shape), rtol=1e-12)


def test_the_family_and_its_modes_table_is_what_the_library_does():
    """Each row's calls per step (1 + the gradients one inline update takes) and whether the
    transparent mode runs it, computed from the member it names."""
    from gam_optax._transparent import calls_per_step

    rows = list(_modes_rows())
    assert len(rows) == 8
    for expression, gradients, transparent in rows:
        member = _build(expression)
        if transparent.startswith("no"):
            assert "Hessian-vector products" in gradients, expression
            with pytest.raises(ValueError, match="Hessian-vector products"):
                gam_optax.transparent(member, optax.sgd(0.1))
        elif expression.startswith("sam_gam"):  # 4 when sam_rho is hvp_step, else 5
            shared = gam_optax.sam_gam(0.1, 0.5, sam_rho=0.05, hvp_step=0.05)
            assert (calls_per_step(shared), calls_per_step(member)) == (4, 5)
            assert transparent == "4 or 5 calls" and gradients.startswith("4 when")
        else:
            assert transparent.split()[:2] == [str(calls_per_step(member)), "calls"]
            assert gradients == str(calls_per_step(member))


def test_every_extra_a_readme_command_installs_exists_and_covers_its_command():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    used = set(re.findall(r'pip install -e "\.\[(\w+)\]"', TEXT))
    assert used == {"flax", "experiments", "docs", "test"}
    assert used <= set(extras)
    # the Flax recipes, the training programs and the documentation (autodoc imports
    # gam_optax.flax) each need Flax; the test extra holds the others
    for extra in ("experiments", "docs"):
        assert "gam-optax[flax]" in extras[extra], extra
    assert any(r.startswith("flax>=") for r in extras["flax"])
    assert "gam-optax[experiments,docs]" in extras["test"]


def test_every_local_link_of_the_readme_leads_to_a_file():
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", outside_code(TEXT))
    local = [link for link in links if not link.startswith("http")]
    assert "CONTRIBUTING.md" in local and "docs/guides/flax.md" in local
    for link in local:
        assert (ROOT / link).is_file(), f"README links to {link}, which does not exist"
