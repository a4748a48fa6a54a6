"""The train step and epoch as pure functions, built once from a config and jitted.

The train step is a pure function of (state, batch, key) and runs inside a
`lax.scan` over one epoch, jitted once with the state donated, so an epoch is a
single device call with no host synchronisation inside. Randomness is
`fold_in(key, step)` and the data order `fold_in(key, epoch)`, so a resumed run
draws exactly the numbers an uninterrupted one would. `training_fns` is what
`vaekl.train.train_and_evaluate` runs (and what benchmarks time); the loss is
`make_loss_fn`'s: the ELBO with a KL term, or a `vaekl.bounds` objective, whose fields
`check_loss_config` checks (`vaekl.config.check` calls it before any data loads).
"""

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from vaekl import bounds, distributed, elbo, kl, models, validate
from vaekl.categorical import RelaxedCategorical


class TrainState(NamedTuple):
    """step (updates done), params, opt_state, and baseline: the score-function gradient's
    running mean of the ELBO (`update_baseline`; carried, unused, by every other run)."""

    step: jax.Array
    params: Any
    opt_state: Any
    baseline: jax.Array


def update_baseline(ema: jax.Array, batch_elbo: jax.Array, decay: float) -> jax.Array:
    """The exponential moving average of the batch-mean ELBO after one more step."""
    return decay * ema + (1.0 - decay) * batch_elbo.astype(ema.dtype)


def baseline_value(ema: jax.Array, step: jax.Array, decay: float) -> jax.Array:
    """The baseline b at `step` (updates done): the EMA of the past steps' batch-mean ELBO
    with Adam's bias correction, ema / (1 - decay^step), and 0 at step 0. Past steps only,
    so b does not depend on this step's draws and the score-function gradient stays
    unbiased; the correction makes b a mean from the first step on, not a pull towards 0."""
    done = jnp.asarray(step, ema.dtype)
    return jnp.where(step > 0, ema / (1.0 - decay ** jnp.maximum(done, 1.0)), 0.0)


def temperature(loss_config, step: jax.Array) -> jax.Array:
    """Jang et al.'s schedule of `config.loss`: tau = max(tau_0 exp(-r s), tau_min), s = step
    rounded down to a multiple of 1000 (updated every 1000 steps)."""
    s = (step // 1000) * 1000
    return jnp.maximum(loss_config.temperature * jnp.exp(-loss_config.temperature_rate * s),
                       loss_config.temperature_min)


CATEGORICAL_GRADIENTS = ("gumbel", "st_gumbel", "score")  # config.loss.categorical_gradient's.
# The KL terms of each categorical gradient: k1/k3 of relaxed draws against the discrete
# prior (a mass function at a point of the simplex) would be no KL estimate at all.
CATEGORICAL_KL_TERMS = {"gumbel": ("analytic", "relaxed"), "st_gumbel": ("analytic", "relaxed"),
                        "score": ("analytic", "k1", "k3", "entropy")}


def _categorical_q(q, loss_config, step):
    """The training step's q for categorical latents: `q` itself for the score-function
    gradient, its Gumbel relaxation at `temperature(step)` otherwise (hard for st_gumbel)."""
    if loss_config.categorical_gradient == "score":
        return q
    return RelaxedCategorical(q.logits, temperature(loss_config, step).astype(q.logits.dtype),
                              loss_config.categorical_gradient == "st_gumbel")


def seed_keys(seed: int) -> dict[str, jax.Array]:
    """Independent keys for init, training steps, data order, binarisation and eval."""
    base = jax.random.key(seed)
    return {name: jax.random.fold_in(base, i)
            for i, name in enumerate(("init", "train", "data", "eval"))}


def make_loss_fn(model: models.VAE, config):
    """loss(params, x [B, D], key, step, baseline=0.) -> (scalar loss, metrics of scalars).

    `config.loss.objective` "elbo" is the ELBO of the posterior family
    `config.model.posterior` with the KL term `config.loss.kl` (and beta, KL warm-up, free
    bits); the others are `vaekl.bounds` objectives of the same q, whose loss is minus the
    bound and whose gradient is `config.loss.grad_estimator`'s. Categorical latents train
    with q relaxed or not by `config.loss.categorical_gradient` (`_categorical_q`);
    `baseline` is the score-function gradient's b (`baseline_value`), read only for a q
    that is not reparameterised.
    """
    loss_config = config.loss
    kl_term, num_samples = loss_config.kl, loss_config.num_samples
    beta, warmup, free_bits = loss_config.beta, loss_config.kl_warmup_steps, loss_config.free_bits

    def bound_loss_fn(params, x, key, step, baseline=0.0):
        del step, baseline
        q = model.apply(params, x, method=models.VAE.encode_posterior)
        prior = model.apply(params, method=models.VAE.get_prior)
        log_lik = functools.partial(model.apply, params, x, method=models.VAE.log_likelihood)
        out = bounds.objective(key, q, log_lik, prior, objective=loss_config.objective,
                               num_samples=num_samples, grad_estimator=loss_config.grad_estimator,
                               outer_samples=loss_config.outer_samples,
                               alpha=loss_config.renyi_alpha, beta=loss_config.ciwae_beta)
        loss = -jnp.mean(out.bound)
        return loss, {"loss": loss, "bound": jnp.mean(out.bound), "elbo": jnp.mean(out.elbo),
                      "rate": jnp.mean(out.rate), "distortion": jnp.mean(out.distortion)}

    if loss_config.objective != "elbo":
        return bound_loss_fn

    categorical = config.model.posterior == "categorical"

    def loss_fn(params, x, key, step, baseline=0.0):
        q = model.apply(params, x, method=models.VAE.encode_posterior)
        prior = model.apply(params, method=models.VAE.get_prior)
        if categorical:
            q = _categorical_q(q, loss_config, step)
            if kl_term == "relaxed" and loss_config.prior_temperature:
                prior = RelaxedCategorical(prior.logits, loss_config.prior_temperature)
        log_lik = functools.partial(model.apply, params, x, method=models.VAE.log_likelihood)
        bound = elbo.elbo(key, q, log_lik, prior, kl=kl_term, num_samples=num_samples,
                          baseline=baseline)
        beta_t = beta * jnp.minimum(1.0, (step + 1) / warmup) if warmup else beta
        if free_bits:
            # Kingma et al. (2016): each dimension's batch-mean KL counts at least free_bits.
            per_dim = kl.analytic_per_dim(q.mean, q.log_var, prior=prior)
            rate_term = jnp.sum(jnp.maximum(free_bits, jnp.mean(per_dim, axis=0)))
        else:
            rate_term = jnp.mean(bound.rate)
        loss = jnp.mean(bound.distortion) + beta_t * rate_term
        return loss, {"loss": loss, "elbo": jnp.mean(bound.elbo),
                      "rate": jnp.mean(bound.rate), "distortion": jnp.mean(bound.distortion)}

    return loss_fn


def check_loss_config(config) -> None:
    """Raises one error naming the first bad field of `config.loss` (a complete config whose
    config.model `vaekl.models.check_model_config` passed).

    Called by `vaekl.config.check`, before any data loads: the names, the counts and
    ranges, and the fields that must agree (free bits, the categorical gradient with its
    KL terms, the KL term with the (posterior, prior) pair, the objective's fields).
    Every objective, gradient estimator, posterior and prior combine; what is refused is
    what is undefined (a closed-form KL or entropy that the pair has not, say).

    Raises:
      ValueError (TypeError for a count that is no int): `config.loss.<field>: ...`.
    """
    loss, model = config.loss, config.model
    for field, allowed in (("kl", elbo.KL_TERMS), ("objective", ("elbo",) + bounds.OBJECTIVES),
                           ("grad_estimator", bounds.GRAD_ESTIMATORS),
                           ("categorical_gradient", CATEGORICAL_GRADIENTS)):
        validate.config_choice(config, f"loss.{field}", allowed)
    for field, minimum in (("num_samples", 1), ("outer_samples", 1), ("kl_warmup_steps", 0)):
        validate.config_int(config, f"loss.{field}", minimum=minimum)
    if loss.beta < 0 or loss.free_bits < 0:
        raise ValueError("config.loss.beta and config.loss.free_bits: expected >= 0.")
    if loss.free_bits and (loss.kl != "analytic" or model.prior != "standard"
                           or model.posterior != "diag"):
        raise ValueError("config.loss.free_bits: per-dimension free bits need kl='analytic',"
                         " prior='standard' and posterior='diag' (got kl="
                         f"{loss.kl!r}, prior={model.prior!r}, posterior={model.posterior!r}).")
    _check_categorical(loss, model)
    if loss.objective == "elbo" and model.posterior != "categorical":  # (_check_categorical)
        q_type, p_type = models.pair_types(model.posterior, model.prior)
        kl.check_term(f"config.loss.kl: {loss.kl!r}", loss.kl, q_type, p_type,
                      pair=(f"posterior={model.posterior!r} with prior={model.prior!r}"
                            f" ({kl.pair_name(q_type, p_type)})"))
    _check_objective(loss)


def _check_categorical(loss, model) -> None:
    """The categorical fields of config.loss (by `check_loss_config`): the temperatures and
    the baseline; categorical latents train with objective="elbo" and their gradient's
    KL terms."""
    for field in ("temperature", "temperature_min"):
        if not loss[field] > 0:
            raise ValueError(f"config.loss.{field}: expected > 0, got {loss[field]!r}.")
    if not (loss.temperature_rate >= 0 and loss.prior_temperature >= 0):
        raise ValueError("config.loss.temperature_rate and config.loss.prior_temperature:"
                         " expected >= 0.")
    if not 0.0 <= loss.baseline_decay < 1.0:
        raise ValueError(f"config.loss.baseline_decay: expected a number in [0, 1), got"
                         f" {loss.baseline_decay!r}.")
    if model.posterior != "categorical":
        return
    if loss.objective != "elbo":
        raise ValueError(f"config.loss.objective: {loss.objective!r} has no gradient for"
                         " categorical latents (vaekl.bounds needs a reparameterised q); use"
                         " 'elbo' (score-function or Gumbel gradients).")
    terms = CATEGORICAL_KL_TERMS[loss.categorical_gradient]
    if loss.kl not in terms:
        raise ValueError(f"config.loss.kl: {loss.kl!r} does not apply to categorical_gradient="
                         f"{loss.categorical_gradient!r}; expected one of {terms}.")


def _check_objective(loss) -> None:
    """The fields of config.loss agree with its objective (by `check_loss_config`)."""
    objective = loss.objective
    if objective == "elbo":
        if loss.grad_estimator != "reparam":
            raise ValueError(
                f"config.loss.grad_estimator: {loss.grad_estimator!r} is for the importance-"
                "weighted objectives; with objective='elbo' the gradient follows config.loss.kl"
                " (kl='stl' is sticking the landing; DReG with K = 1 is STL too).")
    elif loss.kl != "analytic" or loss.beta != 1.0 or loss.kl_warmup_steps \
            or loss.free_bits:
        raise ValueError(
            f"config.loss.objective: {objective!r} samples its KL inside the bound; kl,"
            " beta, kl_warmup_steps and free_bits apply to objective='elbo' only (got"
            f" kl={loss.kl!r}, beta={loss.beta}, kl_warmup_steps="
            f"{loss.kl_warmup_steps}, free_bits={loss.free_bits}).")
    if loss.outer_samples > 1 and objective not in ("miwae", "piwae"):
        raise ValueError(f"config.loss.outer_samples: M = {loss.outer_samples} is for"
                         f" objective 'miwae' or 'piwae', not {objective!r}.")
    if not 0.0 <= loss.ciwae_beta <= 1.0:
        raise ValueError(f"config.loss.ciwae_beta: expected a number in [0, 1], got"
                         f" {loss.ciwae_beta!r}.")
    if not (math.isfinite(loss.renyi_alpha) and loss.renyi_alpha >= 0):
        raise ValueError(f"config.loss.renyi_alpha: expected a finite number >= 0 (for alpha < 0"
                         " the Renyi objective is not a lower bound on log p(x)), got"
                         f" {loss.renyi_alpha!r}.")


def make_epoch_fn(model, config, tx, *, steps_per_epoch: int, binarize: bool, mesh=None):
    """epoch(state, keys, epoch, train_x [N, D]) -> (state, per-step metrics [steps_per_epoch]).

    One epoch: a seeded permutation of the training set from fold_in(data key,
    epoch), cut into fixed-size batches (the remainder dropped), each step
    keyed by fold_in(train key, step). The training set is an argument, not a
    closed-over constant: XLA would otherwise compile it into the program
    (1.4 s more compilation for binarized MNIST).

    The metric "grad_norm" is computed only at the steps that are logged (every
    `config.train.log_every_steps`; it is 0 at the others): on a 2-core CPU computing it
    every step cost 10% of the step. With `on_nan='skip'` it is computed every
    step, since the skip decision needs it.
    """
    loss_fn = make_loss_fn(model, config)
    batch_size, skip_bad = config.train.batch_size, config.train.on_nan == "skip"
    log_every, decay = config.train.log_every_steps, config.loss.baseline_decay
    batch_sharding = distributed.batch_sharded(mesh)

    def grad_norm(grads, step):
        if skip_bad:
            return optax.tree.norm(grads)
        # `step` is not vmapped over seeds, so this stays a branch (not a select).
        zero = jnp.zeros((), jax.tree.leaves(grads)[0].dtype)
        return jax.lax.cond(step % log_every == 0, optax.tree.norm, lambda g: zero, grads)

    def step_fn(state, idx, step, keys, train_x):
        """One step; `step` counts from 1 (as logged), `state.step` from 0."""
        x = train_x[idx]
        if batch_sharding is not None:
            x = jax.lax.with_sharding_constraint(x, batch_sharding)
        key = jax.random.fold_in(keys["train"], state.step)
        if binarize:
            key, bin_key = jax.random.split(key)
            x = jax.random.bernoulli(bin_key, x).astype(x.dtype)
        baseline = baseline_value(state.baseline, state.step, decay)
        grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, x, key, state.step,
                                                          baseline)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new = TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state,
                         update_baseline(state.baseline, metrics["elbo"], decay))
        metrics["grad_norm"] = grad_norm(grads, step)
        if skip_bad:
            ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
            new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new,
                               state._replace(step=state.step + 1))
            metrics["skipped"] = (~ok).astype(jnp.float32)
        return new, metrics

    def epoch_fn(state, keys, epoch, train_x):
        perm = jax.random.permutation(jax.random.fold_in(keys["data"], epoch), train_x.shape[0])
        idx = perm[: steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size)
        steps = epoch * steps_per_epoch + 1 + jnp.arange(steps_per_epoch)
        return jax.lax.scan(lambda s, xs: step_fn(s, *xs, keys, train_x), state, (idx, steps))

    return epoch_fn


def init_state(model: models.VAE, tx, config, key: jax.Array, data_dim: int) -> TrainState:
    """Step 0: the model's parameters drawn from `key` and the optimiser's initial state."""
    params = model.init(key, jnp.zeros((1, data_dim), jnp.float32),
                        jnp.zeros((1,) + models.latent_shape(model)))
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                      jnp.zeros((), jnp.float32))


def training_fns(model, config, tx, *, data_dim: int, steps_per_epoch: int, binarize: bool,
                 mesh=None, vmap_seeds: bool | None = None):
    """(keys, init, epoch): what `train_and_evaluate` runs, for it and for benchmarks.

    `keys` are the seeds' keys (config.train.seed, seed + 1, ... stacked when
    config.train.num_seeds > 1); init(keys) -> TrainState and epoch(state, keys, epoch,
    train_x) -> (state, metrics) are jitted, over several seeds vmapped, and the
    epoch donates the state; with a `mesh` both return arrays replicated over it.
    `vmap_seeds=False` maps the epoch over the seeds instead (`_seed_after_seed`);
    by default it does so on CPUs.
    """
    num_seeds = config.train.num_seeds
    keys = [seed_keys(config.train.seed + s) for s in range(num_seeds)]
    keys = jax.tree.map(lambda *k: jnp.stack(k), *keys) if num_seeds > 1 else keys[0]
    vmap = (lambda f, **kw: jax.vmap(f, **kw)) if num_seeds > 1 else (lambda f, **kw: f)
    replicated = distributed.replicated(mesh)
    init = jax.jit(vmap(lambda k: init_state(model, tx, config, k["init"], data_dim)),
                   out_shardings=replicated)
    epoch_fn = make_epoch_fn(model, config, tx, steps_per_epoch=steps_per_epoch,
                             binarize=binarize, mesh=mesh)
    if vmap_seeds is None:
        vmap_seeds = jax.default_backend() != "cpu"
    if num_seeds > 1 and not vmap_seeds:
        epoch_fn = _seed_after_seed(epoch_fn)
    else:
        epoch_fn = vmap(epoch_fn, in_axes=(0, 0, None, None))
    return keys, init, jax.jit(epoch_fn, donate_argnums=(0,), out_shardings=replicated)


def _seed_after_seed(epoch_fn):
    """The seeds' epochs one after another in one program (`lax.map`), for CPUs.

    One seed's matmuls already keep every core busy, so vectorising seeds gains
    nothing on a CPU, and it costs cache: 8 seeds' parameters and Adam moments
    (104 MB for the Flax-example model) overflow a 32 MB L3 where one seed's fit,
    and 8 vmapped seeds ran 7-10% slower per seed than one (benchmarks/README.md). Mapped,
    each seed's state stays in cache for its whole epoch. Same inputs and outputs
    as the vmapped epoch: state and metrics stacked over seeds.
    """
    def mapped(state, keys, epoch, train_x):
        return jax.lax.map(lambda seed: epoch_fn(*seed, epoch, train_x), (state, keys))

    return mapped
