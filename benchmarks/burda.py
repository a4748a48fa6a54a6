"""The study's net beside PyTorch and beside what any implementation must do.

`python -m benchmarks.benchmark --out=DIR --sections=burda` runs `measure` (below): Burda
et al.'s net (784-200-200-50 tanh encoder and decoder, Bernoulli, batch 20, Adam with
b1 0.99 and eps 1e-4, the `iwae` preset) trained as the study trains it, at

  k1    the VAE, k = 1, analytic KL
  k5    IWAE, K = 5, DReG gradients
  k50   IWAE, K = 50, DReG gradients

each contender timed interleaved over epochs of `steps` steps (medians, per step):

  vaekl            the jitted epoch of `vaekl.steps.training_fns` (one device call per epoch)
  torch_eager      the same step in PyTorch (`nn.Linear`, `Adam(foreach=True)`), a Python
                   loop over steps; DReG as vaekl computes it (two decoder passes: the
                   encoder's weights w^2 through z, the decoder's w at stop_gradient(z))
  torch_compile    `torch.compile` of that step function
  limit            the step's matmuls (forward, weight and input gradients; one decoder
                   pass of K draws) and one fused Adam update over the same parameters, in
                   one jitted `lax.scan`: what any implementation of the step must do
  matmul_chain     the matmuls alone (the older, unreachable limit, kept for comparison)

and, as the study runs its seeds, 3 seeds of k1 in one program (`seeds3`). Ratios are
> 1 when vaekl is faster: `vs_torch` = torch's step / vaekl's; `vs_limit` = the
limit's step / vaekl's (1.0: the step does nothing beyond the matmuls and Adam).
"""

import os

import numpy as np

DIM, HIDDEN, LATENTS, BATCH = 784, (200, 200), 50, 20
CASES = {"k1": ("elbo", 1), "k5": ("iwae", 5), "k50": ("iwae", 50)}


def _config(objective, k, num_seeds=1):
    from experiments.configs import train as train_config

    config = train_config.get_config("iwae")
    config.train.num_seeds = num_seeds
    if objective != "elbo":
        config.loss.objective, config.loss.num_samples, config.loss.grad_estimator = (
            objective, k, "dreg")
    return config


def fake_binary_data(n, dim, seed=0):
    """n binary examples [n, dim] with 13% ones (as MNIST's binarised pixels)."""
    return (np.random.default_rng(seed).random((n, dim), dtype=np.float32) < 0.13).astype(
        np.float32)


def vaekl_epoch(objective, k, steps, num_seeds=1):
    """run() = one jitted epoch of `steps` train steps of the study's config."""
    import jax
    import jax.numpy as jnp

    from vaekl import models, train
    from vaekl import steps as steps_lib

    config = _config(objective, k, num_seeds)
    model = models.VAE(latents=LATENTS, data_dim=DIM, hidden=HIDDEN, activation="tanh")
    tx = train.create_optimizer(config, steps)
    x = jnp.asarray(fake_binary_data(steps * BATCH, DIM))
    keys, init, step = steps_lib.training_fns(model, config, tx, data_dim=DIM,
                                              steps_per_epoch=steps, binarize=False)
    holder = [init(keys)]
    holder[0], metrics = step(holder[0], keys, 0, x)
    jax.block_until_ready(metrics)

    def run():
        holder[0], out = step(holder[0], keys, 1, x)
        jax.block_until_ready(out)

    return run


def _layer_shapes(k):
    """(rows, in, out) of each dense layer's matmul in one step: encoder on the batch,
    decoder on K draws of it."""
    enc = [(BATCH, DIM, HIDDEN[0]), (BATCH, HIDDEN[0], HIDDEN[1]), (BATCH, HIDDEN[1], 2 * LATENTS)]
    rows = BATCH * k
    dec = [(rows, LATENTS, HIDDEN[0]), (rows, HIDDEN[0], HIDDEN[1]), (rows, HIDDEN[1], DIM)]
    return enc + dec


def limit_epoch(k, steps, with_adam=True):
    """run() = `steps` steps of the matmuls (forward; weight gradients; input gradients but
    at the input layer) and, `with_adam`, an Adam update of the same weights and biases."""
    import jax
    import jax.numpy as jnp
    import optax

    shapes = _layer_shapes(k)
    keys = jax.random.split(jax.random.key(0), len(shapes) + 1)
    params = [{"w": 0.01 * jax.random.normal(kk, (i, o)), "b": jnp.zeros((o,))}
              for kk, (_, i, o) in zip(keys, shapes)]
    acts = [jax.random.normal(kk, (r, i)) for kk, (r, i, _) in zip(keys, shapes)]
    tx = optax.adam(1e-3, b1=0.99, eps=1e-4)
    opt_state = tx.init(params)

    def one(carry, _):
        params, opt_state, c = carry  # c: a scalar that keeps XLA from hoisting the matmuls.
        grads = []
        for n, (p, a) in enumerate(zip(params, acts)):
            y = (a + c) @ p["w"] + p["b"]  # Forward.
            dy = 1e-3 * y
            dx = dy @ p["w"].T if n else None  # Input gradient (but of the data).
            grads.append({"w": a.T @ dy + (0.0 if dx is None else 1e-9 * dx.sum()),
                          "b": dy.sum(0)})
        c = 1e-12 * sum(g["b"][0] for g in grads)
        if with_adam:
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
        return (params, opt_state, c), None

    f = jax.jit(lambda c: jax.lax.scan(one, c, None, length=steps)[0])
    holder = [(params, opt_state, jnp.zeros(()))]
    holder[0] = f(holder[0])
    jax.block_until_ready(holder[0])

    def run():
        holder[0] = f(holder[0])
        jax.block_until_ready(holder[0])

    return run


def torch_epoch(objective, k, steps, compiled):
    """run() = `steps` steps of the same training step in PyTorch (CPU, as many threads)."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)

    def mlp(widths):
        layers = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(torch.nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(torch.nn.Tanh())
        return torch.nn.Sequential(*layers)

    enc = mlp((DIM, *HIDDEN, 2 * LATENTS))
    dec = mlp((LATENTS, *HIDDEN[::-1], DIM))
    params = list(enc.parameters()) + list(dec.parameters())
    opt = torch.optim.Adam(params, lr=1e-3, betas=(0.99, 0.999), eps=1e-4, foreach=True)
    data = torch.from_numpy(fake_binary_data(steps * BATCH, DIM)).view(steps, BATCH, DIM)
    log2pi = float(np.log(2 * np.pi))

    def log_lik(z, x):  # [K, B, latents] -> [K, B]
        return -F.binary_cross_entropy_with_logits(dec(z), x.expand(z.shape[0], -1, -1),
                                                   reduction="none").sum(-1)

    def vae_loss(x):
        mean, log_var = enc(x).chunk(2, dim=-1)
        z = mean + torch.exp(0.5 * log_var) * torch.randn_like(mean)
        kl = 0.5 * torch.sum(mean.square() + torch.expm1(log_var) - log_var)
        return (kl - log_lik(z[None], x).sum()) / x.shape[0]

    def dreg_loss(x):
        mean, log_var = enc(x).chunk(2, dim=-1)
        eps = torch.randn((k,) + mean.shape)
        z = mean + torch.exp(0.5 * log_var) * eps
        sm, slv = mean.detach(), log_var.detach()
        log_q = -0.5 * (((z - sm) ** 2) * torch.exp(-slv) + slv + log2pi).sum(-1)
        log_p = -0.5 * (z**2 + log2pi).sum(-1)
        u = log_lik(z, x) + log_p - log_q  # Encoder: the path through z only.
        zd = z.detach()
        u_dec = log_lik(zd, x) - 0.5 * (zd**2 + log2pi).sum(-1)
        w = torch.softmax(u.detach(), 0)
        bound = (w**2 * u).sum(0) + ((w - w**2) * u_dec).sum(0)
        return -bound.sum() / x.shape[0]

    return torch_steps(vae_loss if objective == "elbo" else dreg_loss, opt, data, compiled)


def torch_steps(loss_fn, opt, data, compiled: bool):
    """run() = one PyTorch optimiser step of `loss_fn` on each of data[0], data[1], ...;
    the step function eager or `torch.compile`d, warmed up on three batches first."""
    import torch

    def step(x):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(x)
        loss.backward()
        opt.step()
        return loss

    if compiled:
        step = torch.compile(step)
    for i in range(3):
        step(data[i])

    def run():
        for x in data:
            step(x)

    return run


def measure(timeit, stats, steps, repeats, with_torch: bool) -> dict:
    """Every case's contenders, interleaved; `timeit` and `stats` are the benchmark's."""
    res = {}
    for name, (objective, k) in CASES.items():
        runs = {"vaekl": vaekl_epoch(objective, k, steps), "limit": limit_epoch(k, steps),
                "matmul_chain": limit_epoch(k, steps, with_adam=False)}
        if with_torch:
            runs["torch_eager"] = torch_epoch(objective, k, steps, compiled=False)
            runs["torch_compile"] = torch_epoch(objective, k, steps, compiled=True)
        if name == "k1":
            runs["seeds3"] = vaekl_epoch(objective, k, steps, num_seeds=3)
        t = {c: stats(v, steps) for c, v in timeit(runs, repeats).items()}
        vaekl = t["vaekl"]["median"]
        case = {f"{c}_step_s": v for c, v in t.items()}
        case["vaekl_steps_per_s"] = 1.0 / vaekl
        case["vs_limit"] = t["limit"]["median"] / vaekl
        case["vs_matmul_chain"] = t["matmul_chain"]["median"] / vaekl
        if with_torch:
            case["vs_torch"] = t["torch_eager"]["median"] / vaekl
            case["vs_torch_compile"] = t["torch_compile"]["median"] / vaekl
        if "seeds3" in t:
            case["seeds3_seed_steps_per_s"] = 3.0 / t["seeds3"]["median"]
        res[name] = case
    return res


def markdown(res: dict) -> list[str]:
    """Table lines of `measure`'s results."""
    lines = ["", "Burda et al.'s net (784-200-200-50 tanh, batch 20; medians, ratios > 1 when"
             " vaekl is faster):", "",
             "| case | vaekl steps/s | vs torch eager | vs torch.compile | vs matmul+Adam limit |"
             " vs matmul chain | 3 seeds: seed-steps/s |", "|---|---|---|---|---|---|---|"]
    for name, c in res.items():
        cells = [f"{c['vaekl_steps_per_s']:.0f}"] + [
            f"{c[k]:.2f}" if k in c else "–" for k in ("vs_torch", "vs_torch_compile",
                                                     "vs_limit", "vs_matmul_chain")]
        seeds = f"{c['seeds3_seed_steps_per_s']:.0f}" if "seeds3_seed_steps_per_s" in c else "–"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {seeds} |")
    return lines
