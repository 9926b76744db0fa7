"""Every ```python block of the README runs as written, and does what the text around it says.

The quick start runs exactly as written, in an empty namespace. Each other block is
recognised by a line it contains and runs in a namespace with the few names it assumes (a
model, data, a loss); the test then checks the block's claims. A new block must get an entry
in ``SCAFFOLDS`` (or in another test, named in ``ELSEWHERE``): the first test fails until it
has one. The README is for users: at most 300 lines, its sections in a reader's order, its
first screen's commands and the family's table as promised, and every local link alive. The
guides' blocks in ``docs/`` are run by ``tests/test_docs.py``.
"""

import contextlib
import io
import pathlib
import re
import tomllib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import gam_optax

ROOT = pathlib.Path(__file__).parents[1]
README = ROOT / "README.md"
TEXT = README.read_text(encoding="utf-8")
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, re.S)


def block(marker: str) -> str:
    found = [b for b in BLOCKS if marker in b]
    assert len(found) == 1, f"expected one README block containing {marker!r}, found {len(found)}"
    return found[0]


def data(n=32, d=6, k=3):
    """A learnable problem: the label is the largest of the first k features."""
    x = jax.random.normal(jax.random.key(0), (n, d))
    return x, jnp.argmax(x[:, :k], axis=1)


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(nn.Dense(16)(x))
        return nn.Dense(3)(nn.relu(x))


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(6, 16, rngs=rngs)
        self.bn = nnx.BatchNorm(16, momentum=0.5, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.out = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(self.drop(jax.nn.relu(self.bn(self.hidden(x)))))


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


def linen():
    """Linen: loss_fn forwarded, step counted, BatchNorm statistics from the g0 pass move."""
    x, y = data()
    model = LinenNet()
    variables = model.init(jax.random.key(1), x, train=False)
    cross_entropy = lambda logits, labels: optax.softmax_cross_entropy_with_integer_labels(
        logits, labels
    ).mean()
    namespace = dict(jax=jax, optax=optax, gam_optax=gam_optax, model=model)
    namespace.update(variables=variables, cross_entropy=cross_entropy)
    exec(block("gam_optax.flax.TrainState.create("), namespace)
    state, losses = namespace["state"], []
    for _ in range(20):
        state, loss = namespace["train_step"](state, {"image": x, "label": y})
        losses.append(float(loss))
    assert int(state.step) == 20
    assert losses[-1] < 0.8 * losses[0]
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state.batch_stats,
                         variables["batch_stats"])  # fmt: skip
    assert min(jax.tree.leaves(moved)) > 1e-3


def nnx_recipe():
    """NNX: the loss goes down, BatchNorm statistics move, the step counter counts."""
    x, y = data()
    model = NNXNet(nnx.Rngs(0))
    tx = optax.chain(gam_optax.gam(rho=0.1, rho_prime=0.02), optax.sgd(0.1))
    namespace = dict(jax=jax, optax=optax, model=model, tx=tx)
    exec(block("nnx_loss_fn(model, loss)"), namespace)
    train_step, optimizer = namespace["train_step"], namespace["optimizer"]
    mean_before = np.asarray(model.bn.mean[...]).copy()
    losses = [float(train_step(model, optimizer, x, y)) for _ in range(20)]
    assert losses[-1] < 0.8 * losses[0]
    assert int(optimizer.step[...]) == 20
    assert float(np.max(np.abs(np.asarray(model.bn.mean[...]) - mean_before))) > 1e-3


SCAFFOLDS = {
    "def train_step(params, state, batch):": quick_start,
    "gam_optax.flax.TrainState.create(": linen,
    "nnx_loss_fn(model, loss)": nnx_recipe,
}
ELSEWHERE = {
    "CPU_OPTIONS": "tests/library/test_performance.py",
    "def max_pool_2x2": "tests/library/test_performance.py",
    "sam_rho=": "tests/library/test_sam_gam.py",
}


def test_every_readme_block_is_run_by_a_test():
    markers = [*SCAFFOLDS, *ELSEWHERE]
    for text in BLOCKS:
        owners = [m for m in markers if m in text]
        assert len(owners) == 1, f"README block without exactly one test:\n{text[:300]}"


@pytest.mark.parametrize("marker", list(SCAFFOLDS))
def test_readme_block_runs_and_does_what_it_says(marker):
    SCAFFOLDS[marker]()


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
        member, gradients, inline, scanned, transparent = line.strip("|").split(" | ")
        assert (inline.strip(), scanned.strip()) == ("yes", "yes"), line
        yield re.search(r"`([^`]+)`", member).group(1), gradients.strip(), transparent.strip()


def _build(expression):
    """The member a row names, with example values for its hyperparameters."""
    code = expression.replace("..., ", "").replace("(...)", "()")
    values = dict(rho=0.1, alpha=0.2, penalty=0.5, sam_rho=0.05, r=0.02)
    return eval(f"gam_optax.{code}", {"gam_optax": gam_optax, **values})


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
