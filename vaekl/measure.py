"""The measurements of the experiments, in one place: moments of many random draws and of seeds.

- `Moments`: running moments of draws that arrive in chunks (one pass, float64) and their
  standard errors; `leave_one_out` and `jackknife_se`: the delete-a-group jackknife over
  groups of draws.
- `draw_moments`: the moments of fn(keys) over many draws, computed chunk by chunk, with
  the one key scheme of every experiment: draw i uses `fold_in(key, i)`, whatever the chunk.
- `gradient_draws`: a jitted (params, keys) -> the loss and its gradient per draw, flattened
  per parameter group (`vaekl.models.split_params` by default).
- `snr` and `gradient_figures`: the signal-to-noise ratio of a gradient (one definition)
  and the figures reported beside it.
- `seed_summary`: mean, sample std (ddof 1) and n of a figure over seeds: every "±" over
  seeds in a table or results file is this std; `seed_figures` applies it to a run's
  results.json.
- What the experiments measure at: `vae_checkpoints` (a VAE's parameters after given numbers
  of epochs of `vaekl.train`'s training) and `finished_results` (a finished run's results).
"""

import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vaekl import config as config_lib


class Moments:
    """Count, mean and the central moment sums M2, M3, M4 of the rows added so far.

    M_k = sum_i (x_i - mean)^k. Each chunk [n, ...] is merged with the pairwise
    update of Chan, Golub and LeVeque (1979), extended to the third and fourth
    moments by Pebay (2008, Sandia report SAND2008-6212), so the moments
    of many draws need one chunk in memory at a time and lose no precision to
    running sums of powers. M3 is kept only to merge M4; M4 gives the standard
    error of the variance (`variance_se`) without assuming normal draws.
    """

    def __init__(self):
        self.n, self.mean, self.m2, self.m3, self.m4 = 0, 0.0, 0.0, 0.0, 0.0

    @classmethod
    def of(cls, x) -> "Moments":
        """The moments of the rows of x [n, ...]; they have shape [...]."""
        x = np.asarray(x, np.float64)
        out = cls()
        out.n, out.mean = x.shape[0], x.mean(0)
        d = x - out.mean
        d2 = np.square(d)
        out.m2, out.m3, out.m4 = d2.sum(0), (d2 * d).sum(0), np.square(d2).sum(0)
        return out

    def merged(self, other: "Moments") -> "Moments":
        """The moments of the rows of self and other together (neither is changed)."""
        if other.n == 0 or self.n == 0:
            return other if self.n == 0 else self
        na, nb = self.n, other.n
        n = na + nb
        delta = other.mean - self.mean
        d2 = np.square(delta)
        out = Moments()
        out.n = n
        out.mean = self.mean + delta * nb / n
        out.m2 = self.m2 + other.m2 + d2 * na * nb / n
        out.m3 = (self.m3 + other.m3 + d2 * delta * na * nb * (na - nb) / n**2
                  + 3 * delta * (na * other.m2 - nb * self.m2) / n)
        out.m4 = (self.m4 + other.m4 + np.square(d2) * na * nb * (na * na - na * nb + nb * nb)
                  / n**3 + 6 * d2 * (na * na * other.m2 + nb * nb * self.m2) / n**2
                  + 4 * delta * (na * other.m3 - nb * self.m3) / n)
        return out

    def add(self, x) -> None:
        """Merges the rows of x [n, ...] into these moments."""
        total = self.merged(Moments.of(x))
        self.n, self.mean, self.m2, self.m3, self.m4 = (total.n, total.mean, total.m2,
                                                        total.m3, total.m4)

    def variance(self) -> np.ndarray:
        """The sample variance (ddof 1) of each entry, [...].

        Raises:
          ValueError: for fewer than two rows (n - 1 = 0), rather than a NaN that
            would pass into every figure and SE built on it.
        """
        if self.n < 2:
            raise ValueError(f"a sample variance needs at least 2 draws, got {self.n}.")
        return self.m2 / (self.n - 1)

    def mean_se(self) -> np.ndarray:
        """The standard error of the mean, sqrt(variance / n), [...]."""
        return np.sqrt(self.variance() / self.n)

    def variance_se(self) -> np.ndarray:
        """The standard error of the sample variance s^2, [...].

        Var(s^2) = mu4 / n - sigma^4 (n - 3) / (n (n - 1)) for independent draws
        (any distribution with a finite fourth moment), with mu4 = M4 / n and
        sigma^2 = s^2 put in; for normal draws it is about s^2 sqrt(2 / (n - 1)).
        """
        n, var = self.n, self.variance()
        return np.sqrt(np.maximum(self.m4 / n - np.square(var) * (n - 3) / (n - 1), 0.0) / n)

    def std_se(self) -> np.ndarray:
        """The standard error of the sample std s, by the delta method: SE(s^2) / (2 s), [...]."""
        return self.variance_se() / (2 * np.sqrt(self.variance()))


def merge_all(moments) -> Moments:
    """The moments of every row of the `Moments` in `moments` together."""
    total = Moments()
    for m in moments:
        total = total.merged(m)
    return total


def leave_one_out(moments: list) -> list:
    """[the moments of every group but g, for each g] of a list of groups' `Moments`, by
    prefix and suffix merges (2G merges, not G^2): the replicates of a delete-a-group
    jackknife."""
    prefix, suffix = [Moments()], [Moments()]
    for m in moments[:-1]:
        prefix.append(prefix[-1].merged(m))
    for m in moments[:0:-1]:
        suffix.append(suffix[-1].merged(m))
    return [p.merged(q) for p, q in zip(prefix, reversed(suffix))]


def jackknife_se(replicates) -> float:
    """The delete-a-group jackknife standard error from G leave-one-out replicates [G] of a
    figure: sqrt((G - 1)/G sum_g (theta_g - mean theta)^2)."""
    replicates = np.asarray(replicates, np.float64)
    g = replicates.size
    return float(np.sqrt((g - 1) / g * np.sum(np.square(replicates - replicates.mean()))))


def draw_moments(fn: Callable, key, *, num_draws: int, chunk: int, groups: int = 1,
                 progress=None) -> dict:
    """The moments of `num_draws` random draws of fn, `chunk` draws per call.

    Draw i uses the key `fold_in(key, i)`, so a draw does not depend on the chunk size (the
    one key scheme of the experiments). Every call has `chunk` keys (the last one padded,
    its extra rows dropped): one compiled shape.

    Args:
      fn: keys [n] -> a dict {name: array [n, ...]} of the n draws' values.
      key: a JAX PRNG key.
      num_draws: draws in all (>= 1).
      chunk: draws per call of fn (>= 1).
      groups: G, the number of consecutive groups of draws (draw i in group i * G //
        num_draws), each with its own moments: the groups of a delete-a-group jackknife.
      progress: a `vaekl.progress.Progress` counting draws, advanced after each call, or None.

    Returns:
      {name: [G `Moments`, one per group]} of the values of each name, shape [...] each.
    """
    if num_draws < 1 or chunk < 1 or not 1 <= groups <= num_draws:
        raise ValueError(f"draw_moments: expected num_draws >= 1, chunk >= 1 and 1 <= groups <="
                         f" num_draws, got {num_draws}, {chunk} and {groups}.")
    fold = jax.jit(jax.vmap(jax.random.fold_in, in_axes=(None, 0)))
    out = {}
    for start in range(0, num_draws, chunk):
        idx = np.arange(start, start + chunk)
        used = idx < num_draws
        values = jax.tree.map(np.asarray, fn(fold(key, jnp.asarray(idx))))
        group_of = idx[used] * groups // num_draws
        for name, v in values.items():
            moments = out.setdefault(name, [Moments() for _ in range(groups)])
            v = v[used]
            for g in np.unique(group_of):
                moments[g].add(v[group_of == g])
        if progress is not None:
            progress.advance(int(used.sum()))
    return out


def flatten(tree, batch_dims: int = 1) -> jax.Array:
    """The leaves of `tree` as one array [*batch, P], the first `batch_dims` axes kept."""
    leaves = jax.tree.leaves(tree)
    return jnp.concatenate([l.reshape(l.shape[:batch_dims] + (-1,)) for l in leaves], axis=-1)


def gradient_draws(loss: Callable, split: Callable | None = None) -> Callable:
    """A jitted (params, keys [n]) -> {"loss": [n], part: gradients [n, P_part], ...}.

    Args:
      loss: (params, key) -> a scalar loss.
      split: gradient tree -> {part name: subtree}; default `vaekl.models.split_params`
        ("encoder" and "decoder" of a `vaekl.models.VAE`'s variables).

    Returns:
      The function: the loss and, per part, its gradient's leaves flattened, for each key.
    """
    if split is None:
        from vaekl import models  # Flax on first use only.

        split = models.split_params

    @jax.jit
    def draws(params, keys):
        values, grads = jax.vmap(jax.value_and_grad(loss), in_axes=(None, 0))(params, keys)
        return {"loss": values, **{part: flatten(g) for part, g in split(grads).items()}}

    return draws


def snr(m: Moments) -> float | None:
    """The signal-to-noise ratio of a random vector g from the moments of its draws:
    |E g|_2 / sqrt(sum_p Var g_p), the mean's norm over the expected norm of one draw's
    noise; None where every entry has zero variance."""
    total = float(np.sum(m.variance()))
    return float(np.linalg.norm(m.mean)) / math.sqrt(total) if total > 0 else None


def gradient_figures(m: Moments, prefix: str) -> dict:
    """The figures of the gradient draws of one parameter group, from their moments [P]:
    `<prefix>_grad_variance` (1/P) sum_p Var g_p, `_grad_total_variance` sum_p Var g_p,
    `_grad_mean_norm` |E g|, `_snr` (`snr`) and `_num_params` P."""
    var = m.variance()
    return {f"{prefix}_grad_variance": float(np.sum(var)) / var.size,
            f"{prefix}_grad_total_variance": float(np.sum(var)),
            f"{prefix}_grad_mean_norm": float(np.linalg.norm(m.mean)),
            f"{prefix}_snr": snr(m),
            f"{prefix}_num_params": int(var.size)}


class SeedSummary(NamedTuple):
    """A figure over seeds: the mean, the sample std (ddof 1; None for one seed) and n."""

    mean: float | None
    std: float | None
    n: int


def seed_summary(values: Iterable) -> SeedSummary:
    """The `SeedSummary` of the numbers in `values` (None entries are skipped).

    The std is the sample std (ddof 1): with n = 3 it is sqrt(3/2) = 1.22 times the
    population std (ddof 0). Its mean's standard error is std / sqrt(n).
    """
    numbers = [float(v) for v in values if v is not None]
    n = len(numbers)
    if n == 0:
        return SeedSummary(None, None, 0)
    mean = math.fsum(numbers) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in numbers) / (n - 1)) if n > 1 else None
    return SeedSummary(mean, std, n)


# The results.json figures that the experiments' tables summarise over seeds.
SEED_FIELDS = ("test_elbo", "test_log_likelihood", "test_rate", "active_units")


def seed_values(results: dict, field: str) -> list:
    """The per-seed values of `field` in a run's results.json (`vaekl.evaluate`'s layout:
    a `seeds` list when the run trained several seeds, else the one seed's value)."""
    if "seeds" in results:
        return [s[field] for s in results["seeds"]]
    return [results[field]]


def seed_figures(results: dict, fields=SEED_FIELDS) -> dict:
    """For each of `fields` in a run's `results`: `<field>_mean`, `_std` (sample std, ddof 1;
    None for one seed), `_mean_se` (std / sqrt(n), the mean's standard error) and `_seeds`
    (the values), from `seed_summary`."""
    row = {}
    for field in fields:
        if field in results:
            values = seed_values(results, field)
            summary = seed_summary(values)
            row[f"{field}_mean"] = summary.mean
            row[f"{field}_mean_se"] = (summary.std / math.sqrt(summary.n)
                                       if summary.std is not None else None)
            row[f"{field}_std"] = summary.std
            row[f"{field}_seeds"] = [float(v) for v in values]
    return row


def finished_results(workdir: Path, cfg) -> dict | None:
    """The results.json of a finished run in `workdir` with exactly the config `cfg`, else None.

    A run with another config is left to `vaekl.train.train_and_evaluate`, which resumes it
    (a longer num_epochs, say) or refuses the workdir with a message naming the change.
    """
    results, saved = Path(workdir) / "results.json", Path(workdir) / "config.json"
    if not (results.exists() and saved.exists()):
        return None
    # Leaf by leaf: a config.json of the flat layout (before the config was nested) counts.
    if config_lib.leaves(json.loads(saved.read_text())) != config_lib.leaves(
            json.loads(cfg.to_json_best_effort())):
        return None
    return json.loads(results.read_text())


def vae_checkpoints(train_config, epochs: dict, what: str = "training the VAE"):
    """A VAE's parameters after given numbers of epochs of one run of `train_config`.

    train.py's own initialisation, keys and epoch, so the parameters after e epochs are those
    `vaekl.train.train_and_evaluate` reaches (the epoch is not donated: earlier parameters
    stay valid).

    Args:
      train_config: a training config (`vaekl.config`); its train.num_epochs is replaced by the
        largest of `epochs`.
      epochs: {checkpoint name: epochs of training}.
      what: the progress lines' name of the training.

    Returns:
      (model, the config as run, {name: params after epochs[name] epochs}).
    """
    from vaekl import progress as progress_lib
    from vaekl import steps as steps_lib
    from vaekl import train

    cfg = train_config.copy_and_resolve_references()
    cfg.train.num_epochs = max(epochs.values())
    train_data, _ = train.load_data(cfg)
    model = train.create_model(cfg, train_data)
    steps_per_epoch = len(train_data) // cfg.train.batch_size
    tx = train.create_optimizer(cfg, steps_per_epoch)
    keys = steps_lib.seed_keys(cfg.train.seed)
    state = steps_lib.init_state(model, tx, cfg, keys["init"], train_data.dim)
    train_x = jnp.asarray(train_data.x)
    epoch_fn = jax.jit(steps_lib.make_epoch_fn(model, cfg, tx, steps_per_epoch=steps_per_epoch,
                                               binarize=train_data.dynamic_binarization))
    out = {}
    progress = progress_lib.Progress(what, cfg.train.num_epochs, unit="epochs", quiet_s=5.0)
    for epoch in range(cfg.train.num_epochs + 1):
        out.update({name: state.params for name, e in epochs.items() if e == epoch})
        if epoch < cfg.train.num_epochs:
            state, _ = epoch_fn(state, keys, epoch, train_x)
            jax.block_until_ready(state)
            progress.advance(1)
    return model, cfg, {name: out[name] for name in epochs}
