"""Linear Gaussian encoders q(z|x) for the linear-Gaussian model of `vaekl.linear_gaussian`.

The experiments on that model (`gradient_variance`, `posterior_gap`) share one amortised
family, its parameters a dict of arrays: mean = x A + a (`mean_kernel` [d, k],
`mean_bias` [k]), and either a diagonal q with log_var = x C + c (`mean_field`:
`log_var_kernel`, `log_var_bias`; a `DiagNormal`) or one full Cholesky factor shared by
every x (`full`: strictly lower `tril` [k, k] and `log_diag` [k]; a `FullNormal`). The
decoder is linear Gaussian too: log N(x; z W^T + b, s^2 I).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vaekl import elbo as elbo_lib
from vaekl.distributions import DiagNormal, FullNormal, gaussian_log_prob


def apply(params, x, family):
    """q(z|x) of x [N, d] with batch shape [N]: a `DiagNormal` for `mean_field`, a
    `FullNormal` (scale_tril [N, k, k]) for `full`."""
    mean = x @ params["mean_kernel"] + params["mean_bias"]
    if family == "mean_field":
        return DiagNormal(mean, x @ params["log_var_kernel"] + params["log_var_bias"])
    k = mean.shape[-1]
    tril = jnp.tril(params["tril"], -1) + jnp.diag(jnp.exp(params["log_diag"]))
    return FullNormal(mean, jnp.broadcast_to(tril, mean.shape[:-1] + (k, k)))


def init(d, k, family, dtype):
    """Zero weights: q = p(z) = N(0, I) for every x."""
    z = functools.partial(jnp.zeros, dtype=dtype)
    params = {"mean_kernel": z((d, k)), "mean_bias": z((k,))}
    if family == "mean_field":
        params.update(log_var_kernel=z((d, k)), log_var_bias=z((k,)))
    else:
        params.update(tril=z((k, k)), log_diag=z((k,)))
    return params


def exact(model) -> dict:
    """`mean_field` params (float64 NumPy) with q(z|x) = p(z|x), for a W with orthogonal
    columns (a diagonal posterior): mean = x K + a, log_var = x 0 + log v."""
    w, b, s2 = np.asarray(model.w), np.asarray(model.b), model.noise_std**2
    wtw = w.T @ w
    assert np.allclose(wtw, np.diag(np.diag(wtw))), "W must have orthogonal columns"
    v = 1.0 / (1.0 + np.diag(wtw) / s2)  # diag M^-1
    kernel = w * v / s2  # x K = (M^-1 W^T x / s^2)^T: K = W M^-1 / s^2, [d, k]
    return {"mean_kernel": kernel, "mean_bias": -b @ kernel,
            "log_var_kernel": np.zeros_like(kernel), "log_var_bias": np.log(v)}


def decoder_log_likelihood(x, kernel, bias, log_scale):
    """z [S, N, k] -> log N(x; z kernel + bias, e^(2 log_scale) I) [S, N], x [N, d]."""
    return lambda z: gaussian_log_prob(x, z @ kernel + bias, log_scale)


def true_log_likelihood(model, x):
    """`decoder_log_likelihood` of the model's own decoder (W, b, s), in x's dtype."""
    w, b = jnp.asarray(model.w, x.dtype), jnp.asarray(model.b, x.dtype)
    return decoder_log_likelihood(x, w.T, b, jnp.log(model.noise_std))


def _neg_elbo(params, x, key, model, family, num_samples):
    """-mean ELBO by Monte Carlo: reconstruction sampled, KL(q || p(z)) analytic."""
    log_lik = true_log_likelihood(model, x)  # The decoder is the true model, fixed.
    bound = elbo_lib.elbo(key, apply(params, x, family), log_lik, kl="analytic",
                          num_samples=num_samples)
    return -jnp.mean(bound.elbo)


def train(model, x_train, key, family, *, steps, learning_rate, batch_size, num_samples):
    """Adam (cosine decay from `learning_rate`) on minibatches of x_train [n, d], the decoder
    fixed at the true model; the parameters after each step, stacked [steps + 1, ...]."""
    n, d = x_train.shape
    params = init(d, model.latent_dim, family, x_train.dtype)
    tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))

    @jax.jit
    def run(params, key):
        def step(carry, i):
            params, opt_state = carry
            k_batch, k_z = jax.random.split(jax.random.fold_in(key, i))
            idx = jax.random.randint(k_batch, (batch_size,), 0, n)
            grads = jax.grad(_neg_elbo)(params, x_train[idx], k_z, model, family, num_samples)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return (params, opt_state), params

        _, history = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(steps))
        return history

    history = run(params, key)
    return jax.tree.map(lambda p0, h: jnp.concatenate([p0[None], h]), params, history)
