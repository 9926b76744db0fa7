"""Tests of gam_optax.flatness against dense Hessians (jax.hessian + eigh) and closed forms."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jax.tree_util import Partial

from gam_optax import flatness
from gam_optax._validation import describe

# Outside the fast tier (CONTRIBUTING.md): Flax, flatness, README examples, mypy.
pytestmark = pytest.mark.slow

KEY = jax.random.key(0)

# ----------------------------------------------------------------------------
# Quadratics L = 0.5 x^T A x - b^T x. Passed as Partial(quadratic, A, b): A and b
# are then arguments of the compiled steps, so one compilation serves every A.
# ----------------------------------------------------------------------------


def quadratic(a, b, x):
    return 0.5 * x @ a @ x - b @ x


def quadratic_loss(a, b):
    return Partial(quadratic, jnp.asarray(a), jnp.asarray(b))


def symmetric(eigenvalues, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(eigenvalues),) * 2))
    return q @ np.diag(eigenvalues) @ q.T


def max_convex_quadratic(m, c, rho):
    """max over ||d|| <= rho of 0.5 d^T M d + c^T d, M PSD and c != 0: d = (lam I - M)^-1 c
    with lam > lambda_max(M) solving the secular equation ||d(lam)|| = rho (bisection)."""
    lam, q = np.linalg.eigh(m)
    cq = q.T @ c
    lo, hi = lam[-1], lam[-1] + np.linalg.norm(c) / rho
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if np.linalg.norm(cq / (mid - lam)) > rho else (lo, mid)
    d = q @ (cq / (hi - lam))
    assert abs(np.linalg.norm(d) - rho) < 1e-9 * rho
    return 0.5 * d @ m @ d + c @ d


@pytest.fixture(scope="module")
def convex():
    rng = np.random.default_rng(3)
    a = symmetric([3.0, 2.0, 1.0, 0.7, 0.5, 0.2], seed=1)
    return a, rng.normal(size=6), rng.normal(size=6)


SPECTRA = {
    "positive definite": [3.0, 2.0, 1.0, 0.7, 0.5, 0.2],
    "indefinite": [-5.0, -1.0, 0.5, 1.0, 2.0, 2.5],
    "negative definite": [-3.0, -2.0, -1.5, -1.0, -0.5, -0.1],
    "repeated and singular": [2.0, 2.0, 2.0, 1.0, 0.0, 0.0],
}


@pytest.mark.parametrize("spectrum", SPECTRA)
def test_top_eigenvalue_of_a_quadratic(spectrum):
    """Lanczos with num_iterations >= n is exact, also through breakdowns (repeated
    eigenvalues) and with no positive eigenvalue (no spurious 0)."""
    eigenvalues = np.array(SPECTRA[spectrum])
    with jax.enable_x64(True):
        loss = quadratic_loss(symmetric(eigenvalues), np.ones(6))
        top = flatness.hessian_top_eigenvalue(loss, jnp.zeros(6), KEY)
        by_magnitude = flatness.hessian_top_eigenvalue(loss, jnp.zeros(6), KEY, largest="magnitude")
        few = flatness.hessian_top_eigenvalue(loss, jnp.zeros(6), KEY, num_iterations=2)
    np.testing.assert_allclose(top, eigenvalues.max(), rtol=1e-10)
    np.testing.assert_allclose(
        by_magnitude, eigenvalues[np.argmax(np.abs(eigenvalues))], rtol=1e-10
    )
    assert float(few) <= eigenvalues.max() + 1e-12  # a Ritz value is a lower bound
    assert float(few) > eigenvalues.min()


def test_top_eigenvector():
    a = symmetric([4.0, 1.0, 0.5, -2.0], seed=2)
    with jax.enable_x64(True):
        params = {"u": jnp.zeros(3), "v": jnp.zeros(())}  # a pytree: flattened in order u, v
        loss = lambda p: quadratic(jnp.asarray(a), jnp.zeros(4), ravel_pytree(p)[0])
        value, vector = flatness.hessian_top_eigenvalue(loss, params, KEY, return_eigenvector=True)
        flat = np.asarray(ravel_pytree(vector)[0])
    expected = np.linalg.eigh(a)[1][:, -1]
    np.testing.assert_allclose(value, 4.0, rtol=1e-12)
    np.testing.assert_allclose(abs(flat @ expected), 1.0, rtol=1e-10)
    assert vector["u"].shape == (3,) and vector["v"].shape == ()


# ----------------------------------------------------------------------------
# A tiny MLP (32 parameters in a dict), against its dense Hessian.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp():
    rng = np.random.default_rng(4)
    params = {
        "w1": rng.normal(size=(3, 5)) * 0.8,
        "b1": rng.normal(size=5) * 0.1,
        "w2": rng.normal(size=(5, 2)),
        "b2": np.zeros(2),
    }
    x, y = rng.normal(size=(8, 3)), rng.integers(0, 2, size=8)
    return params, x, y


def mlp_loss(x, y, params):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    logits = h @ params["w2"] + params["b2"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def dense_hessian(loss, params):
    flat, unravel = ravel_pytree(params)
    return np.asarray(jax.jit(jax.hessian(lambda v: loss(unravel(v))))(flat))


def test_mlp_top_eigenvalue_and_trace(mlp):
    params, x, y = mlp
    with jax.enable_x64(True):
        params = jax.tree.map(jnp.asarray, params)
        loss = Partial(mlp_loss, jnp.asarray(x), jnp.asarray(y))
        hessian = dense_hessian(loss, params)
        top = flatness.hessian_top_eigenvalue(loss, params, KEY)  # 20 < 32 iterations
        trace = flatness.hessian_trace(loss, params, KEY, num_samples=64)
        again = flatness.hessian_trace(loss, params, KEY, num_samples=64)
        other = flatness.hessian_trace(loss, params, jax.random.key(1), num_samples=64)
    eigenvalues = np.linalg.eigvalsh(hessian)
    assert eigenvalues.min() < 0 < eigenvalues.max()
    np.testing.assert_allclose(top, eigenvalues.max(), rtol=1e-6)
    # Hutchinson (Rademacher): unbiased, variance 2 sum_{i != j} H_ij^2 / N.
    off_diagonal = hessian - np.diag(np.diag(hessian))
    sigma = np.sqrt(2 * np.sum(off_diagonal**2) / 64)
    assert abs(float(trace) - np.trace(hessian)) < 4 * sigma
    assert float(trace) == float(again)  # deterministic for a key
    assert float(trace) != float(other)


def test_trace_is_exact_for_a_diagonal_hessian():
    """z^T D z = tr(D) for every Rademacher z."""
    with jax.enable_x64(True):
        loss = lambda p: jnp.sum(jnp.array([1.0, -2.0, 3.5]) * p["x"] ** 2) + jnp.sum(p["y"] ** 4)
        params = {"x": jnp.ones(3), "y": jnp.array([0.5, -1.0])}
        trace = flatness.hessian_trace(loss, params, KEY, num_samples=1)
    np.testing.assert_allclose(trace, 2 * (1.0 - 2.0 + 3.5) + 12 * (0.25 + 1.0), rtol=1e-12)


def test_trace_of_a_dense_quadratic_converges():
    a = symmetric([3.0, 2.0, 1.0, 0.7, 0.5, 0.2], seed=5)
    sigma1 = np.sqrt(2 * np.sum((a - np.diag(np.diag(a))) ** 2))
    with jax.enable_x64(True):
        loss = quadratic_loss(a, np.zeros(6))
        for n in (16, 1024):
            trace = flatness.hessian_trace(loss, jnp.zeros(6), KEY, num_samples=n)
            assert abs(float(trace) - np.trace(a)) < 4 * sigma1 / np.sqrt(n)


# ----------------------------------------------------------------------------
# Zeroth- and first-order flatness.
# ----------------------------------------------------------------------------


def test_zeroth_order_flatness_of_a_convex_quadratic(convex):
    """R0 = max_{||d|| <= rho} c^T d + 0.5 d^T A d, c = A theta - b (secular equation)."""
    a, b, theta = convex
    rho = 0.3
    c = a @ theta - b
    expected = max_convex_quadratic(a, c, rho)
    with jax.enable_x64(True):
        loss = quadratic_loss(a, b)
        value = flatness.zeroth_order_flatness(loss, jnp.asarray(theta), rho, num_steps=40)
        one_step = flatness.zeroth_order_flatness(loss, jnp.asarray(theta), rho, num_steps=1)
        values = [
            float(flatness.zeroth_order_flatness(loss, jnp.asarray(theta), rho, num_steps=k))
            for k in (1, 2, 3, 5)
        ]
        # At the minimum (zero gradient): 0.5 rho^2 lambda_max, from a random start.
        at_min = flatness.zeroth_order_flatness(
            loss, jnp.asarray(np.linalg.solve(a, b)), rho, num_steps=80
        )
    np.testing.assert_allclose(value, expected, rtol=1e-10)
    e = rho * c / np.linalg.norm(c)  # SAM's step
    np.testing.assert_allclose(one_step, c @ e + 0.5 * e @ a @ e, rtol=1e-12)
    assert np.all(np.diff(values) >= 0) and values[-1] > values[0]
    np.testing.assert_allclose(at_min, 0.5 * rho**2 * 3.0, rtol=1e-8)


def test_zeroth_order_flatness_is_the_largest_visited_loss_not_the_last(x64):
    """A non-convex loss, L = sin(x), rho = 2: the ascent visits +2 (sin 2 = 0.909), then
    -2 twice (L' = cos 2 < 0 at both); the estimate is the best visited point, sin 2."""
    loss = lambda x: jnp.sum(jnp.sin(x))
    got = flatness.zeroth_order_flatness(loss, jnp.zeros(1), rho=2.0, num_steps=3)
    np.testing.assert_allclose(got, np.sin(2.0), rtol=1e-12)


def test_first_order_flatness_of_a_quadratic(convex):
    """R1 = rho max ||c + A d|| = rho sqrt(||c||^2 + 2 max (A c)^T d + 0.5 d^T A^2 d)."""
    a, b, theta = convex
    rho = 0.3
    c = a @ theta - b
    expected = rho * np.sqrt(c @ c + 2 * max_convex_quadratic(a @ a, a @ c, rho))
    # The closed form beats 20,000 random points of the sphere, and not by much.
    rng = np.random.default_rng(0)
    d = rng.normal(size=(20000, 6))
    sampled = rho * np.max(
        np.linalg.norm(c + rho * (d / np.linalg.norm(d, axis=1)[:, None]) @ a, axis=1)
    )
    assert expected * (1 - 1e-2) < sampled <= expected
    with jax.enable_x64(True):
        loss = quadratic_loss(a, b)
        value = flatness.first_order_flatness(loss, jnp.asarray(theta), rho, num_steps=60)
        at_min = flatness.first_order_flatness(
            loss, jnp.asarray(np.linalg.solve(a, b)), rho, num_steps=60
        )
    np.testing.assert_allclose(value, expected, rtol=1e-10)
    np.testing.assert_allclose(at_min, rho**2 * 3.0, rtol=1e-8)  # rho * ||A d||max


def test_flatness_of_the_mlp_beats_random_search(mlp):
    """On a non-convex loss the ascent finds more than SAM's one step and than 2,000
    random points of the sphere."""
    params, x, y = mlp
    rho = 0.2
    with jax.enable_x64(True):
        params = jax.tree.map(jnp.asarray, params)
        loss = Partial(mlp_loss, jnp.asarray(x), jnp.asarray(y))
        r0 = flatness.zeroth_order_flatness(loss, params, rho)
        r0_one = flatness.zeroth_order_flatness(loss, params, rho, num_steps=1)
        r1 = flatness.first_order_flatness(loss, params, rho)
        r1_one = flatness.first_order_flatness(loss, params, rho, num_steps=1)
        flat, unravel = ravel_pytree(params)
        d = jax.random.normal(jax.random.key(7), (2000, flat.size), flat.dtype)
        points = flat + rho * d / jnp.linalg.norm(d, axis=1, keepdims=True)
        value_and_grad = jax.value_and_grad(lambda v: loss(unravel(v)))
        loss_and_norm = lambda v: (lambda lg: (lg[0], jnp.linalg.norm(lg[1])))(value_and_grad(v))
        value_and_norm = jax.jit(jax.vmap(loss_and_norm))
        base, grad_norm = (float(v[0]) for v in value_and_norm(flat[None]))
        losses, norms = value_and_norm(points)
        max_loss, max_norm = float(jnp.max(losses)), float(jnp.max(norms))
    assert float(r0) >= float(r0_one) > 0
    assert float(r0) > max_loss - base
    assert float(r1) >= float(r1_one) >= rho * grad_norm
    assert float(r1) > rho * max_norm


def affine(g, p):
    return g @ p["w"] + 1.5


def test_zero_hessian_gives_zero_not_nan():
    """A linear loss: H = 0, R0 = R1 = rho ||g||. A constant loss (g = 0): everything 0."""
    with jax.enable_x64(True):
        params = {"w": jnp.ones(3)}
        for g, norm in (([1.0, -2.0, 2.0], 3.0), ([0.0, 0.0, 0.0], 0.0)):
            loss = Partial(affine, jnp.array(g))
            value, vector = flatness.hessian_top_eigenvalue(
                loss, params, KEY, return_eigenvector=True
            )
            np.testing.assert_array_equal(value, 0.0)
            assert bool(jnp.all(jnp.isfinite(vector["w"])))
            np.testing.assert_array_equal(flatness.hessian_trace(loss, params, KEY), 0.0)
            r0 = flatness.zeroth_order_flatness(loss, params, 0.1)
            r1 = flatness.first_order_flatness(loss, params, 0.1)
            np.testing.assert_allclose([r0, r1], [0.1 * norm, 0.1 * norm], rtol=1e-14, atol=1e-15)
            # rho = 0: the ball is the point.
            assert float(flatness.zeroth_order_flatness(loss, params, 0.0)) == 0.0
            assert float(flatness.first_order_flatness(loss, params, 0.0)) == 0.0


# ----------------------------------------------------------------------------
# The data-set loss.
# ----------------------------------------------------------------------------


def test_dataset_loss_is_the_full_batch_loss(mlp):
    """4 stacked batches give the concatenated batch's loss, gradient and Hessian-vector
    products -- everything a measure uses -- and so the same measures."""
    params, x, y = mlp
    with jax.enable_x64(True):
        params = jax.tree.map(jnp.asarray, params)
        batches = {"x": jnp.asarray(x).reshape(4, 2, 3), "y": jnp.asarray(y).reshape(4, 2)}
        per_batch = lambda p, batch: mlp_loss(batch["x"], batch["y"], p)
        data_loss = flatness.dataset_loss(per_batch, batches)
        full = Partial(mlp_loss, jnp.asarray(x), jnp.asarray(y))
        tangent = jax.tree.map(jnp.ones_like, params)
        value_grad_hvp = lambda f: jax.jvp(jax.value_and_grad(f), (params,), (tangent,))
        got, want = jax.jit(lambda: (value_grad_hvp(data_loss), value_grad_hvp(full)))()
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(
            flatness.hessian_trace(data_loss, params, KEY, 4),
            flatness.hessian_trace(full, params, KEY, 4),
            rtol=1e-12,
        )
        # Other batches of the same shapes reuse the compiled steps (batches are arguments).
        reversed_batches = jax.tree.map(lambda v: v[::-1], batches)
        other = flatness.dataset_loss(per_batch, reversed_batches)
        np.testing.assert_allclose(
            flatness.hessian_trace(other, params, KEY, 4),
            flatness.hessian_trace(full, params, KEY, 4),
            rtol=1e-12,
        )


def test_each_measure_compiles_its_step_once_per_loss_fn():
    """The loop runs in Python around a jitted step: other points, keys and counts
    (num_iterations, num_samples, num_steps) reuse the compiled step."""
    traces = []

    def loss(p):
        traces.append(1)  # runs only when JAX traces the function
        return jnp.sum(jnp.sin(p) ** 2)

    measures = {
        "hessian_top_eigenvalue": lambda p, n, k: flatness.hessian_top_eigenvalue(loss, p, k, n),
        "hessian_trace": lambda p, n, k: flatness.hessian_trace(loss, p, k, num_samples=n),
        "zeroth_order_flatness": lambda p, n, k: flatness.zeroth_order_flatness(
            loss, p, 0.1, n, key=k
        ),
        "first_order_flatness": lambda p, n, k: flatness.first_order_flatness(
            loss, p, 0.1, n, key=k
        ),
    }
    for name, measure in measures.items():
        before = len(traces)
        measure(jnp.ones(3), 1, KEY)
        first = len(traces) - before
        before = len(traces)
        measure(2 * jnp.ones(3), 3, jax.random.key(1))
        measure(jnp.ones(3), 2, KEY)
        again = len(traces) - before
        # The first call traces the loss (in the step); later calls trace nothing: the
        # step is reused, and so is the shape check (jax.eval_shape caches its trace).
        assert first >= 1 and again == 0, (name, first, again)


def test_errors_are_early_and_clear():
    loss = lambda p: jnp.sum(p**2)
    params = jnp.ones(2)
    with pytest.raises(ValueError, match="rho must be a finite number >= 0"):
        flatness.zeroth_order_flatness(loss, params, -0.1)
    with pytest.raises(ValueError, match="rho must be a finite number >= 0"):
        flatness.first_order_flatness(loss, params, float("nan"))
    with pytest.raises(ValueError, match="num_iterations must be an integer >= 1"):
        flatness.hessian_top_eigenvalue(loss, params, KEY, num_iterations=0)
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
        flatness.hessian_trace(loss, params, KEY, num_samples=2.5)
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
        flatness.first_order_flatness(loss, params, 0.1, num_steps=0)
    with pytest.raises(ValueError, match="largest must be"):
        flatness.hessian_top_eigenvalue(loss, params, KEY, largest="smallest")
    with pytest.raises(ValueError, match="must return a scalar loss, got \\(2,\\)"):
        flatness.hessian_trace(lambda p: p**2, params, KEY)
    with pytest.raises(ValueError, match="must return a scalar loss"):
        flatness.hessian_top_eigenvalue(lambda p: (jnp.sum(p), p), params, KEY)
    with pytest.raises(TypeError, match="floating-point"):
        flatness.hessian_trace(lambda p: jnp.sum(p > 0), params, KEY)
    with pytest.raises(ValueError, match="same leading"):
        flatness.dataset_loss(
            lambda p, b: jnp.sum(b["x"]), {"x": jnp.ones((3, 2)), "y": jnp.ones(4)}
        )


def _bad_calls_of(measure, call, count, tree_loss):
    """(measure, call, error, message) for the bad arguments every measure shares."""
    ones = jnp.ones(2)
    # Integer or bool parameters: the loss would be differentiated at integer points.
    for params, path in (
        (jnp.array([1, 2]), r"params has dtype int32"),
        (jnp.array([True, False]), r"params has dtype bool"),
        ({"w": ones, "n": jnp.array([3])}, r"params\['n'\] has dtype int32"),
    ):
        kw = {"loss": tree_loss} if isinstance(params, dict) else {}
        yield measure, lambda c=call, p=params, kw=kw: c(p, **kw), TypeError, path
    for value, error in (
        (0, ValueError),
        (-3, ValueError),
        (2.0, ValueError),
        ("3", ValueError),
        (True, ValueError),
        (None, ValueError),
    ):
        yield (
            measure,
            lambda c=call, n=count, v=value: c(ones, **{n: v}),
            error,
            f"{count} must be an integer >= 1",
        )
    for key in (0, "key", jax.random.split(KEY, 3), jnp.zeros(3, jnp.uint32)):
        yield (
            measure,
            lambda c=call, k=key: c(ones, key=k),
            TypeError,
            "key must be one PRNG key, e.g. key=jax.random.key.*, got " + re.escape(describe(key)),
        )
    if "flatness" in measure:
        for rho, error, fragment in (
            (-0.1, ValueError, "must be a finite number >= 0"),
            (float("inf"), ValueError, "must be a finite number >= 0"),
            ("0.1", TypeError, "must be a real number"),
            (None, TypeError, "must be a real number"),
            (True, TypeError, "must be a real number, got the bool"),
            (jnp.ones(2), ValueError, "must be a scalar"),
            (lambda t: 0.1, TypeError, "must be a number, not a schedule"),
        ):
            yield (
                measure,
                lambda c=call, r=rho: c(ones, rho=r),
                error,
                f"rho {fragment}.*Pass a finite Python float"
                if "schedule" not in fragment
                else f"rho {fragment}",
            )


def _bad_flatness_calls():
    """(call, error, message) for bad arguments of every measure."""
    loss = lambda p: jnp.sum(jnp.asarray(p, jnp.float32) ** 2)
    tree_loss = lambda p: jnp.sum(p["w"] ** 2) + jnp.sum(p["n"])
    ones = jnp.ones(2)
    measures = {
        "hessian_top_eigenvalue": lambda p, **kw: flatness.hessian_top_eigenvalue(
            kw.pop("loss", loss), p, kw.pop("key", KEY), **kw
        ),
        "hessian_trace": lambda p, **kw: flatness.hessian_trace(
            kw.pop("loss", loss), p, kw.pop("key", KEY), **kw
        ),
        "zeroth_order_flatness": lambda p, **kw: flatness.zeroth_order_flatness(
            kw.pop("loss", loss), p, kw.pop("rho", 0.1), **kw
        ),
        "first_order_flatness": lambda p, **kw: flatness.first_order_flatness(
            kw.pop("loss", loss), p, kw.pop("rho", 0.1), **kw
        ),
    }
    counts = {
        "hessian_top_eigenvalue": "num_iterations",
        "hessian_trace": "num_samples",
        "zeroth_order_flatness": "num_steps",
        "first_order_flatness": "num_steps",
    }
    for measure, call in measures.items():
        yield from _bad_calls_of(measure, call, counts[measure], tree_loss)
    yield (
        "hessian_top_eigenvalue",
        lambda: flatness.hessian_top_eigenvalue(loss, ones, KEY, return_eigenvector="yes"),
        TypeError,
        "return_eigenvector must be a Python bool",
    )
    yield (
        "hessian_top_eigenvalue",
        lambda: flatness.hessian_top_eigenvalue(loss, ones, KEY, largest=None),
        ValueError,
        "largest must be one of",
    )


BAD_FLATNESS_CALLS = list(_bad_flatness_calls())


@pytest.mark.parametrize(
    ("measure", "call", "error", "message"),
    BAD_FLATNESS_CALLS,
    ids=[f"{m}-{i}" for i, (m, *_) in enumerate(BAD_FLATNESS_CALLS)],
)
def test_bad_arguments_name_the_measure_and_the_argument(measure, call, error, message):
    with pytest.raises(error, match=f"{measure}: .*{message}"):
        call()


def test_legal_argument_forms_agree():
    """A raw uint32 key, a NumPy int count and a 0-d array radius are accepted and give
    what the plain forms give (the same computation: equal to float32 rounding)."""
    loss = lambda p: 0.5 * jnp.sum(jnp.array([3.0, 1.0]) * p**2)
    params = jnp.array([0.5, -1.0])
    plain = flatness.first_order_flatness(loss, params, 0.1, num_steps=3)
    other = flatness.first_order_flatness(
        loss, params, jnp.asarray(0.1), num_steps=np.int64(3), key=jax.random.PRNGKey(0)
    )
    np.testing.assert_allclose(other, plain, rtol=1e-6)
    # The Hessian is diag(3, 1): lambda_max = 3 from a raw key too.
    value = flatness.hessian_top_eigenvalue(loss, params, jax.random.PRNGKey(1), np.int32(2))
    np.testing.assert_allclose(value, 3.0, rtol=1e-5)
