"""One name per algorithm, the deprecated names, and the version shims of gam_optax._compat.

gam (Algorithm 2; hessian=True: exact Hessian-vector products, label gam_exact_hvp),
gam_penalty (Algorithm 1) and sam_gam (SAM + GAM); gam_hessian and GAMHessianState are the
names before 0.1.0, kept for a release with a DeprecationWarning that names the new spelling.
"""

import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gam_optax
from gam_optax import _compat

LOSS = lambda p: jnp.sum((p - 1.0) ** 2) + jnp.sum(p**4)
PARAMS = jnp.array([2.0, -1.0, 0.5])


def direction(tx):
    return tx.update(jax.grad(LOSS)(PARAMS), tx.init(PARAMS), PARAMS, loss_fn=LOSS)[0]


@pytest.mark.parametrize(
    ("kwargs", "new", "spelling"),
    [
        ({}, gam_optax.gam_penalty, "gam_optax.gam_penalty(rho, penalty"),
        ({"hvp_step": 0.05}, gam_optax.gam_penalty, "gam_optax.gam_penalty(rho, penalty"),
        ({"sam_rho": 0.05}, gam_optax.sam_gam, "gam_optax.sam_gam(rho, penalty, sam_rho)"),
        (
            {"sam_rho": 0.05, "hvp_step": 0.05},
            gam_optax.sam_gam,
            "gam_optax.sam_gam(rho, penalty, sam_rho)",
        ),
    ],
)
def test_gam_hessian_warns_names_the_new_spelling_and_computes_the_same(kwargs, new, spelling):
    with pytest.warns(DeprecationWarning, match=r"gam_hessian is deprecated") as caught:
        old = gam_optax.gam_hessian(0.1, 0.5, **kwargs)
    assert spelling in str(caught[0].message)
    assert caught[0].filename == __file__  # points at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new names do not warn
        np.testing.assert_array_equal(direction(old), direction(new(0.1, 0.5, **kwargs)))


def test_gam_hessian_state_warns_and_is_the_penalty_state():
    with pytest.warns(DeprecationWarning, match=r"GAMHessianState .*use gam_optax.GAMPenaltyState"):
        state_type = gam_optax.GAMHessianState
    assert state_type is gam_optax.GAMPenaltyState
    assert isinstance(gam_optax.gam_penalty(0.1, 0.5).init(PARAMS), state_type)
    with pytest.raises(AttributeError, match="no attribute 'gam_hessian_state'"):
        gam_optax.gam_hessian_state  # noqa: B018


def test_deprecated_names_are_not_in_all_and_new_ones_are():
    assert "gam_hessian" not in gam_optax.__all__
    assert "GAMHessianState" not in gam_optax.__all__
    assert {"gam_penalty", "sam_gam", "GAMPenaltyState"} <= set(gam_optax.__all__)


def test_errors_name_the_function_that_was_called():
    with pytest.raises(ValueError, match=r"^gam_penalty: rho must be"):
        gam_optax.gam_penalty(-0.1, 0.5)
    with pytest.raises(ValueError, match=r"^sam_gam: sam_rho must be"):
        gam_optax.sam_gam(0.1, 0.5, sam_rho=-0.05)
    with pytest.raises(TypeError, match=r"^sam_gam: sam_rho must be a real number.*gam_penalty"):
        gam_optax.sam_gam(0.1, 0.5, sam_rho=None)
    # The deprecated name builds the new one, whose name its errors give.
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match=r"^gam_penalty: rho"):
        gam_optax.gam_hessian(-0.1, 0.5)
    tx = gam_optax.sam_gam(0.1, 0.5, sam_rho=0.05)
    with pytest.raises(TypeError, match=r"^sam_gam\.update: state must be the PerturbationState"):
        tx.update(PARAMS, optax.sgd(0.1).init(PARAMS), PARAMS, loss_fn=LOSS)


def test_sam_gam_and_gam_penalty_work_under_inject_hyperparams():
    for factory, kwargs in (
        (gam_optax.gam_penalty, dict(rho=0.1, penalty=0.5)),
        (gam_optax.sam_gam, dict(rho=0.1, penalty=0.5, sam_rho=0.05)),
    ):
        injected = optax.inject_hyperparams(factory)(**kwargs)
        plain = factory(**kwargs)
        d = injected.update(jax.grad(LOSS)(PARAMS), injected.init(PARAMS), PARAMS, loss_fn=LOSS)
        np.testing.assert_allclose(d[0], direction(plain), rtol=1e-6)


def test_the_labels_are_the_names():
    """The benchmark and the experiments label each algorithm by its name."""
    pytest.importorskip("ml_collections")  # the experiments' extra
    from experiments import benchmark, optimizers

    assert "gam_hessian" not in benchmark.OPTIMIZERS
    assert benchmark.OPTIMIZERS["gam_exact_hvp"] == ("gam", {"hessian": True})
    assert optimizers.PERTURBATIONS["sam_gam"].factory == "sam_gam"


def test_a_bfloat16_scalar_hyperparameter_is_a_real_number():
    """optax 0.2.5's inject_hyperparams passes bfloat16 scalars for bfloat16 params."""
    for make in (
        lambda r: gam_optax.gam(rho=r),
        lambda r: gam_optax.sam(r),
        lambda r: gam_optax.gam_penalty(r, r),
    ):
        make(jnp.asarray(0.1, jnp.bfloat16))
    with pytest.raises(ValueError, match="rho must be a finite number >= 0"):
        gam_optax.sam(jnp.asarray(-0.1, jnp.bfloat16))


# ---------------------------------------------------------------------------
# gam_optax._compat: each spelling of the installed jax/flax, and the older ones.
# ---------------------------------------------------------------------------


def test_varying_axes_reads_both_spellings_of_the_type(monkeypatch):
    new = types.SimpleNamespace(manual_axis_type=types.SimpleNamespace(varying={"data"}))
    old = types.SimpleNamespace(vma=frozenset({"data"}))  # jax 0.6.1-0.9
    for aval in (new, old):
        monkeypatch.setattr(_compat, "_TYPEOF", lambda x, aval=aval: aval)
        assert _compat.varying_axes(jnp.zeros(())) == {"data"}
    monkeypatch.setattr(_compat, "_TYPEOF", lambda x: types.SimpleNamespace())
    assert _compat.varying_axes(jnp.zeros(())) == frozenset()
    monkeypatch.setattr(_compat, "_TYPEOF", None)  # no jax.typeof at all
    assert _compat.varying_axes(jnp.zeros(())) == frozenset()


def test_to_varying_uses_pcast_or_pvary(monkeypatch):
    calls = []
    monkeypatch.setattr(_compat, "_PCAST", lambda x, a, to: calls.append(("pcast", a, to)) or x)
    _compat.to_varying(1.0, "data")
    monkeypatch.setattr(_compat, "_PCAST", None)
    monkeypatch.setattr(_compat, "_PVARY", lambda x, a: calls.append(("pvary", a)) or x)
    _compat.to_varying(1.0, "data")
    assert "pvary(params, 'data')" in _compat.to_varying_spelling("data")
    monkeypatch.setattr(_compat, "_PVARY", None)
    assert _compat.to_varying(1.0, "data") == 1.0
    assert calls == [("pcast", "data", "varying"), ("pvary", "data")]


def test_vma_checked_is_false_where_marking_fails(monkeypatch):
    """jax 0.9's pcast fails an assertion under jax.pmap, which has no varying types."""

    def failing_pcast(x, axis_name, to):
        raise AssertionError(frozenset({axis_name}))

    monkeypatch.setattr(_compat, "_PCAST", failing_pcast)
    assert _compat.vma_checked("data") is False
    monkeypatch.setattr(_compat, "_PCAST", lambda x, a, to: x)
    monkeypatch.setattr(_compat, "varying_axes", lambda x: frozenset({"data"}))
    assert _compat.vma_checked("data") is True


def test_axis_size_without_jax_lax_axis_size(monkeypatch):
    monkeypatch.setattr(_compat, "_AXIS_SIZE", None)  # jax < 0.6.1: psum(1, axis)
    sizes = jax.pmap(lambda x: x * _compat.axis_size("i"), axis_name="i")(jnp.ones(4))
    np.testing.assert_array_equal(sizes, [4.0] * 4)
    with pytest.raises(NameError):
        jax.jit(lambda x: x * _compat.axis_size("unbound"))(1.0)


def test_nnx_merge_copy_with_and_without_the_copy_argument():
    calls = []

    def merge_with_copy(graphdef, *states, copy=False):
        calls.append(copy)

    def merge_without_copy(graphdef, *states):  # flax < 0.11.2: always new variables
        calls.append("no copy argument")

    for merge in (merge_with_copy, merge_without_copy):
        _compat.nnx_merge_copy(types.SimpleNamespace(merge=merge), "graphdef", "params")
    assert calls == [True, "no copy argument"]
