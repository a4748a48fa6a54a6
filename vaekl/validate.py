"""Input checks shared by the public functions and the config: dtypes, shapes, names, counts.

Every message names what it checks: a function's argument ("vaekl.kl.sampled:
`num_samples` must be >= 1") or a config field ("config.loss.kl: unknown value").

Shape and dtype checks run at trace time (they only read static information), so
they cost nothing inside `jax.jit`. Finiteness is a value check: it is recorded
with `checkify.debug_check`, a no-op unless the caller wraps the function with
`vaekl.checked`, which turns NaN/inf inputs into a `FloatingPointError` naming
the offending argument.
"""

import functools
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify


def floating(fn_name: str, **arrays) -> dict[str, jax.Array]:
    """Converts each keyword to a floating `jax.Array`, or raises `TypeError`.

    Python floats and ints (literals such as `p_mean=0.0`) are accepted and take
    the dtype of the floating arrays; an integer or boolean array is refused,
    since a silent cast would hide a wrong argument (pixels as uint8, say).
    """
    out = {}
    for name, x in arrays.items():
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            out[name] = x
            continue
        dtype = getattr(x, "dtype", None)
        if dtype is None:
            x = np.asarray(x)
            dtype = x.dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{fn_name}: `{name}` must be a floating-point array (float32 or"
                f" float64), got dtype {dtype}."
            )
        out[name] = jnp.asarray(x)
    return out


def event_shape(fn_name: str, arrays: dict, *, min_ndim: Sequence[str] = ()) -> tuple[int, ...]:
    """Returns the broadcast shape of `arrays`, or raises a `ValueError`.

    Args:
      fn_name: the public function, for the message.
      arrays: name -> array or Python scalar.
      min_ndim: names that must have at least one axis (the event axis).

    Returns:
      The broadcast shape [..., event_dim].
    """
    for name in min_ndim:
        if jnp.ndim(arrays[name]) < 1:
            raise ValueError(
                f"{fn_name}: `{name}` must have a last (event) axis, shape"
                f" [..., dim]; got a scalar."
            )
    shapes = {n: jnp.shape(a) for n, a in arrays.items()}
    try:
        return jnp.broadcast_shapes(*shapes.values())
    except ValueError:
        described = ", ".join(f"{n}{list(s)}" for n, s in shapes.items())
        raise ValueError(
            f"{fn_name}: shapes do not broadcast: {described}; expected equal"
            " event (last) axes and broadcastable leading axes."
        ) from None


def positive_int(fn_name: str, name: str, value) -> int:
    """Checks a static count such as `num_samples` (an int >= 1)."""
    return _int_at_least(f"{fn_name}: `{name}`", value, 1)


def nonnegative_int(fn_name: str, name: str, value) -> int:
    """Checks a seed or an index (an int >= 0)."""
    return _int_at_least(f"{fn_name}: `{name}`", value, 0)


def config_int(config, field: str, *, minimum: int) -> int:
    """Checks that `config.<field>` (a dotted path, "model.latents") is an int >= minimum."""
    return _int_at_least(f"config.{field}", _at(config, field), minimum)


def _at(config, path: str):
    """The value at a dotted `path` of a nested config."""
    for key in path.split("."):
        config = config[key]
    return config


def _int_at_least(subject: str, value, minimum: int) -> int:
    """value as a Python int; a TypeError (not an int) or ValueError (< minimum) names subject."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{subject} must be an int >= {minimum}, got {value!r}.")
    if value < minimum:
        raise ValueError(f"{subject} must be >= {minimum}, got {value}.")
    return int(value)


def prng_key(fn_name: str, key) -> None:
    """Checks that `key` is one PRNG key: jax.random.key(seed) or a raw uint32 PRNGKey."""
    dtype = getattr(key, "dtype", None)
    ndim = jnp.ndim(key) if dtype is not None else None
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key) and ndim == 0:
        return
    if dtype == jnp.uint32 and ndim == 1:
        return
    got = f"dtype {dtype}, shape {list(jnp.shape(key))}" if dtype is not None else repr(key)
    raise TypeError(f"{fn_name}: `key` must be a single PRNG key, jax.random.key(seed) (split"
                    f" it and use jax.vmap for several); got {got}.")


def choice(fn_name: str, name: str, value, allowed: Iterable[str]) -> str:
    """Checks that `value` is one of `allowed`."""
    return _one_of(f"{fn_name}: unknown {name}", value, allowed)


def config_choice(config, field: str, allowed: Iterable[str]) -> str:
    """Checks that `config.<field>` (a dotted path, "loss.kl") is one of `allowed`."""
    return _one_of(f"config.{field}: unknown value", _at(config, field), allowed)


def _one_of(subject: str, value, allowed: Iterable[str]) -> str:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{subject} {value!r}; expected one of {allowed}.")
    return value


def distribution(fn_name: str, name: str, dist, methods=("sample_and_log_prob", "log_prob")):
    """Checks that `dist` has the `vaekl.distributions` interface's `methods` (a TypeError
    naming `name` otherwise), and records finiteness checks (see `finite`) of its floating
    leaves, named like `q.mean`. Returns `dist`."""
    missing = [m for m in methods if not callable(getattr(dist, m, None))]
    if missing:
        raise TypeError(f"{fn_name}: `{name}` must be a distribution with {', '.join(methods)}"
                        f" (see vaekl.distributions), got {type(dist).__name__}.")
    leaves = jax.tree_util.tree_flatten_with_path(dist)[0]
    finite(fn_name, **{name + jax.tree_util.keystr(path): x for path, x in leaves
                       if jnp.issubdtype(jnp.result_type(x), jnp.floating)})
    return dist


def bound_inputs(fn_name: str, key, q, log_likelihood, prior, num_samples):
    """The checks of every bound (`vaekl.elbo`, `vaekl.bounds`): returns (prior, num_samples),
    a None prior being the standard normal; a TypeError or ValueError names the argument."""
    from vaekl.distributions import STANDARD_NORMAL  # Not at import: it imports this module.

    num_samples = positive_int(fn_name, "num_samples", num_samples)
    prng_key(fn_name, key)
    if not callable(log_likelihood):
        raise TypeError(f"{fn_name}: `log_likelihood` must be a function z -> log p(x|z), got"
                        f" {type(log_likelihood).__name__}.")
    distribution(fn_name, "q", q)
    prior = STANDARD_NORMAL if prior is None else prior
    return distribution(fn_name, "prior", prior, methods=("log_prob",)), num_samples


def log_likelihood(fn_name: str, fn: Callable, z: jax.Array,
                   shape: Sequence[int]) -> jax.Array:
    """fn(z), checked to be one log p(x|z) per draw: z [S, ..., *event] -> [S, ...].

    `shape` is that of log q at the draws, [S, ...]: q's event may have one axis (a
    Gaussian's [dim]) or two (a categorical's [N, K]), so it, not z's shape less one
    axis, says what one value per draw is.
    """
    out = fn(z)
    if jnp.shape(out) != tuple(shape):
        raise ValueError(
            f"{fn_name}: `log_likelihood` must map z of shape {list(z.shape)} to shape"
            f" {list(shape)} (one log p(x|z) per draw), got {list(jnp.shape(out))}.")
    return out


def reparameterized(fn_name: str, what: str, q, works: str) -> None:
    """Raises ValueError if q's draws carry no path gradient (`q.reparameterized` False)
    and `what` (an argument and its value) needs one; the message names q's family and
    `works`, what to use instead."""
    if not getattr(q, "reparameterized", True):
        raise ValueError(f"{fn_name}: {what} needs a reparameterised q, and"
                         f" {type(q).__name__} is not (its draws have no path gradient);"
                         f" {works}.")


def finite(fn_name: str, **arrays) -> None:
    """Records NaN/inf checks that only fire under `vaekl.checked`."""
    for name, x in arrays.items():
        if isinstance(x, (int, float)):
            if not np.isfinite(x):
                raise FloatingPointError(f"{fn_name}: `{name}` is {x}.")
            continue
        checkify.debug_check(
            jnp.all(jnp.isfinite(x)), f"{fn_name}: `{name}` has NaN or inf entries."
        )


def checked(fn: Callable) -> Callable:
    """Wraps `fn` so that NaN/inf inputs raise `FloatingPointError`.

    Example: `vaekl.checked(jax.jit(vaekl.kl.analytic))(mean, log_var)`. Wrap a
    jitted function (not the other way round: the raise needs concrete values);
    the check costs one reduction per input.
    """
    checkified = checkify.checkify(fn, errors=checkify.user_checks)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        err, out = checkified(*args, **kwargs)
        msg = err.get()
        if msg is not None:
            raise FloatingPointError(msg.split(" (`check` failed")[0])
        return out

    return wrapper
