"""Which divergence's gradient each KL estimator gives, for a categorical q, exactly.

The k1/k2/k3 estimators (r = p(z)/q(z), with the current q) are used as the KL
penalty of policy-gradient fine-tuning, where z is a sampled token and no
reparameterisation exists. Differentiated as a surrogate loss, each estimator and
way of using it gives some gradient estimate g(z) with respect to q's logits; this
experiment computes E[g] and the single-sample E||g - E g||^2 by enumerating the K
categories, and compares E[g] with the gradients of the reverse KL(q || p) and the
forward KL(p || q).

Surrogates at a draw z, k = estimate(log r) and sg = stop_gradient:
  loss     k                       (z held fixed: what most implementations do)
  score    k + sg(k) log q(z)      (the full score-function gradient of E_q[k])
  reward   sg(k) log q(z)          (k detached, used as a reward)
and samplings: z ~ q (`on_policy`), or z ~ q_old with the weight rho = q(z)/q_old(z)
detached (`old_detached`: sg(rho) L) or differentiated (`old_differentiated`: rho L,
as in PPO-style losses).

Each surrogate depends on the logits only through l = log q(z), and
d log q(z) / d logits = e_z - q, so every estimate is g(z) = c(z) (e_z - q) with the
scalar c(z) = dL/dl, taken here by autodiff of L as a function of l. For z ~ s:
  E[g] = u - (sum u) q with u = s * c,   E||g||^2 = sum_z s_z c_z^2 (1 - 2 q_z + ||q||^2),
O(K) per case, so K = 50,000 is exact too. The references: grad KL(q || p) =
q * (log(q/p) - KL(q || p)), grad KL(p || q) = q - p. A Monte Carlo check draws z and
differentiates each surrogate with respect to the logits directly (no use of the
reduction above) for the smallest K.

Recipe: q's logits ~ N(0, logit_scale^2); p's logits = q's + s * n with n ~ N(0, I)
and s found by bisection so that KL(q || p) is each target; q_old's logits = q's +
s' * n' with KL(q_old || q) = `old_kl`. The Gaussian counterpart (q = N(0, 1) against
p = N(sqrt(2 KL), 1), z = mu + sigma eps reparameterised, gradient in (mu, log sigma),
mode `loss`, expectations by Gauss-Hermite quadrature) is in the same table.
"""

import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments import report
from vaekl import kl as kl_lib

MODES = ("loss", "score", "reward")
SAMPLINGS = ("on_policy", "old_detached", "old_differentiated")
UNBIASED_TOL = 1e-6  # Relative bias below which an estimate counts as unbiased (float64).
COLUMNS = ("family", "num_categories", "kl", "estimator", "mode", "sampling",
           "rel_bias_reverse", "rel_bias_forward", "rel_std", "unbiased_for")
sg = jax.lax.stop_gradient


def surrogate(estimator: str, mode: str, sampling: str, lq, lp, lold):
    """The surrogate loss at one draw as a function of lq = log q(z); lp = log p(z),
    lold = log q_old(z)."""
    k = kl_lib.estimate(estimator, lp - lq)
    loss = {"loss": k, "score": k + sg(k) * lq, "reward": sg(k) * lq}[mode]
    if sampling == "on_policy":
        return loss
    rho = jnp.exp(lq - lold)
    return (sg(rho) if sampling == "old_detached" else rho) * loss


def coefficients(estimator, mode, sampling, lq, lp, lold) -> np.ndarray:
    """c(z) = dL/d log q(z) for every category z, [K]: g(z) = c(z) (e_z - q)."""
    grad = jax.grad(functools.partial(surrogate, estimator, mode, sampling))
    return np.asarray(jax.vmap(grad)(lq, lp, lold))


def exact_moments(c: np.ndarray, s: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, float]:
    """(E[g], E||g - E g||^2) for z ~ s and g(z) = c(z) (e_z - q)."""
    u = s * c
    mean = u - u.sum() * q
    second = float(np.sum(s * c**2 * (1.0 - 2.0 * q + q @ q)))
    return mean, max(second - float(mean @ mean), 0.0)


def categorical_kl(log_a: np.ndarray, log_b: np.ndarray) -> float:
    """KL(a || b) of two categoricals from their log-probabilities (float64)."""
    return float(np.sum(np.exp(log_a) * (log_a - log_b)))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits - logits.max()
    return logits - np.log(np.sum(np.exp(logits)))


def at_kl(base: np.ndarray, direction: np.ndarray, target: float, kl_of) -> np.ndarray:
    """Logits base + s * direction with kl_of(those logits) = target, s by bisection."""
    lo, hi = 0.0, 1.0
    while kl_of(base + hi * direction) < target:
        hi *= 2.0
        if hi > 1e6:
            raise ValueError(f"kl_gradients: no scale reaches KL {target}.")
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if kl_of(base + mid * direction) < target else (lo, mid)
    return base + hi * direction


def categorical_case(key, num_categories: int, target_kl: float, config) -> dict:
    """q, p at KL(q || p) = target_kl and q_old at KL(q_old || q) = config.old_kl, as
    float64 log-probabilities."""
    k_q, k_p, k_old = (np.random.default_rng(np.asarray(k)) for k in
                       jax.random.key_data(jax.random.split(key, 3)))
    theta = config.logit_scale * k_q.standard_normal(num_categories)
    lq = log_softmax(theta)
    lp = log_softmax(at_kl(theta, k_p.standard_normal(num_categories), target_kl,
                           lambda t: categorical_kl(lq, log_softmax(t))))
    lold = log_softmax(at_kl(theta, k_old.standard_normal(num_categories), config.old_kl,
                             lambda t: categorical_kl(log_softmax(t), lq)))
    return {"theta": theta, "lq": lq, "lp": lp, "lold": lold}


def references(lq, lp) -> tuple[np.ndarray, np.ndarray]:
    """(grad KL(q || p), grad KL(p || q)) with respect to q's logits."""
    q, p = np.exp(lq), np.exp(lp)
    return q * (lq - lp - categorical_kl(lq, lp)), q - p


def summarize(mean, variance, reverse, forward) -> dict:
    """The relative biases and std of one estimate, and which divergence it is unbiased for."""
    scale = float(np.linalg.norm(reverse))
    rel_rev = float(np.linalg.norm(mean - reverse)) / scale
    rel_fwd = float(np.linalg.norm(mean - forward)) / float(np.linalg.norm(forward))
    unbiased = [name for name, rel in (("reverse KL(q‖p)", rel_rev),
                                       ("forward KL(p‖q)", rel_fwd)) if rel < UNBIASED_TOL]
    if not unbiased and float(np.linalg.norm(mean)) < UNBIASED_TOL * scale:
        unbiased = ["none: E[g] = 0"]
    return {"rel_bias_reverse": rel_rev, "rel_bias_forward": rel_fwd,
            "rel_std": math.sqrt(variance) / scale, "unbiased_for": ", ".join(unbiased) or "none"}


def categorical_rows(case: dict, num_categories: int, target: float, estimators) -> list[dict]:
    lq, lp, lold = (jnp.asarray(case[k]) for k in ("lq", "lp", "lold"))
    q = np.exp(case["lq"])
    reverse, forward = references(case["lq"], case["lp"])
    rows = []
    for estimator in estimators:
        for mode in MODES:
            for sampling in SAMPLINGS:
                s = q if sampling == "on_policy" else np.exp(case["lold"])
                c = coefficients(estimator, mode, sampling, lq, lp, lold)
                mean, var = exact_moments(c, s, q)
                rows.append({"family": "categorical", "num_categories": num_categories,
                             "kl": target, "estimator": estimator, "mode": mode,
                             "sampling": sampling, **summarize(mean, var, reverse, forward)})
    return rows


def monte_carlo(key, case: dict, estimator, mode, sampling, draws: int):
    """(mean, its standard error) of the gradient over `draws` draws, each differentiated
    with respect to the logits directly (log_softmax, no use of the c(z) reduction)."""
    theta, lp, lold = (jnp.asarray(case[k]) for k in ("theta", "lp", "lold"))
    logits = theta if sampling == "on_policy" else jnp.asarray(case["lold"])
    z = jax.random.categorical(key, logits, shape=(draws,))

    def one(t, zi):
        lq = jax.nn.log_softmax(t)[zi]
        return surrogate(estimator, mode, sampling, lq, lp[zi], lold[zi])

    g = np.asarray(jax.vmap(jax.grad(one), in_axes=(None, 0))(theta, z))
    return g.mean(0), g.std(0, ddof=1) / math.sqrt(draws)


def gaussian_rows(target: float, estimators, nodes: int = 200) -> list[dict]:
    """The reparameterised counterpart: q = N(mu, e^(2 log_sigma)) at (0, 0) against
    p = N(sqrt(2 KL), 1); the gradient in (mu, log_sigma) of k(z), z = mu + sigma eps,
    its moments by Gauss-Hermite quadrature (mode `loss`, on-policy)."""
    x, w = np.polynomial.hermite.hermgauss(nodes)
    eps, w = math.sqrt(2.0) * x, w / math.sqrt(math.pi)
    p_mean = math.sqrt(2.0 * target)
    # At (mu, ls) = (0, 0), with m = p_mean: KL(q || p) = ((mu - m)^2 + e^(2 ls) - 1)/2 - ls
    # has gradient (mu - m, e^(2 ls) - 1) = (-m, 0); KL(p || q) = (1 + (m - mu)^2) e^(-2 ls)/2
    # - 1/2 + ls has gradient (-(m - mu) e^(-2 ls), 1 - (1 + (m - mu)^2) e^(-2 ls)) = (-m, -m^2).
    reverse, forward = np.array([-p_mean, 0.0]), np.array([-p_mean, -p_mean**2])
    rows = []
    for estimator in estimators:
        def k_of(params, e, estimator=estimator):
            mu, ls = params
            z = mu + jnp.exp(ls) * e
            log_q = -0.5 * e**2 - ls  # log N(z; mu, sigma) written in eps (+ const).
            log_p = -0.5 * (z - p_mean) ** 2
            return kl_lib.estimate(estimator, log_p - log_q)

        g = np.asarray(jax.vmap(jax.grad(k_of), in_axes=(None, 0))(jnp.zeros(2), eps))
        mean = w @ g
        var = float(w @ np.sum(g**2, axis=1)) - float(mean @ mean)
        rows.append({"family": "gaussian (reparameterised)", "num_categories": None,
                     "kl": target, "estimator": estimator, "mode": "loss",
                     "sampling": "on_policy", **summarize(mean, var, reverse, forward)})
    return rows


# The claims made in the open (../shared/REFERENCES.md), each a row checked against the table.
CLAIMS = (
    ("k1 as a loss, on-policy: E[grad] = 0 (OpenRLHF #1309, verl #2953)", "k1", "loss",
     "on_policy", "none: E[g] = 0"),
    ("k2 as a loss, on-policy: unbiased for grad KL(q‖p)", "k2", "loss", "on_policy",
     "reverse KL(q‖p)"),
    ("k3 as a loss, on-policy: the forward KL's gradient, grad KL(p‖q)", "k3", "loss",
     "on_policy", "forward KL(p‖q)"),
    ("k3 with samples from q_old and the weight q/q_old (differentiated, PPO-style):"
     " unbiased for the reverse KL (slime #1004/#1039, TRL #4638)", "k3", "loss",
     "old_differentiated", "reverse KL(q‖p)"),
    ("k3 with samples from q_old and a detached weight: still the forward KL", "k3", "loss",
     "old_detached", "forward KL(p‖q)"),
    ("k1 as a detached reward: unbiased for grad KL(q‖p) (arXiv 2512.21852)", "k1", "reward",
     "on_policy", "reverse KL(q‖p)"),
)


def claims(rows: list[dict]) -> list[dict]:
    """Each claim: what it says, what the table shows at every K and KL, confirmed or not."""
    out = []
    for text, estimator, mode, sampling, expected in CLAIMS:
        found = {r["unbiased_for"] for r in rows if r["family"] == "categorical" and
                 (r["estimator"], r["mode"], r["sampling"]) == (estimator, mode, sampling)}
        out.append({"claim": text, "measured": "; ".join(sorted(found)),
                    "verdict": "confirmed" if found == {expected} else "refuted"})
    return out


def run(config, workdir: str) -> dict:
    """Every (estimator, mode, sampling) at each K and KL, the Gaussian rows, the Monte Carlo
    check for K = `mc_categories`; writes results.json, results.md and kl_gradients.png."""
    work = report.prepare_workdir(workdir)
    key = jax.random.key(config.seed)
    rows, checks = [], []
    with jax.enable_x64(True):
        for i, num_categories in enumerate(config.num_categories):
            for j, target in enumerate(config.kls):
                case = categorical_case(jax.random.fold_in(key, 1000 * i + j), num_categories,
                                        target, config)
                case_rows = categorical_rows(case, num_categories, target, config.estimators)
                rows += case_rows
                if num_categories == config.mc_categories:
                    checks += _check(jax.random.fold_in(key, 10**6 + j), case, case_rows,
                                     config.mc_draws)
        for target in config.kls:
            rows += gaussian_rows(target, config.estimators)
    results = {"rows": rows, "claims": claims(rows), "monte_carlo": checks,
               "old_kl": config.old_kl, "mc_max_abs_z": max((c["max_abs_z"] for c in checks),
                                                             default=None)}
    report.publish(work, results, markdown(results, config))
    plot(rows, work / "kl_gradients.png")
    return results


def _check(key, case, case_rows, draws) -> list[dict]:
    """Monte Carlo against the exact mean: the largest |z| over the gradient's components."""
    out = []
    reverse, forward = references(case["lq"], case["lp"])
    for n, row in enumerate(case_rows):
        mean, se = monte_carlo(jax.random.fold_in(key, n), case, row["estimator"], row["mode"],
                               row["sampling"], draws)
        s = np.exp(case["lq"] if row["sampling"] == "on_policy" else case["lold"])
        c = coefficients(row["estimator"], row["mode"], row["sampling"],
                         *(jnp.asarray(case[k]) for k in ("lq", "lp", "lold")))
        exact, _ = exact_moments(c, s, np.exp(case["lq"]))
        z = np.abs(mean - exact) / np.maximum(se, 1e-300)
        out.append({k: row[k] for k in ("kl", "estimator", "mode", "sampling")} |
                   {"max_abs_z": float(z.max()), "draws": draws})
    return out


def markdown(results: dict, config) -> str:
    rows = results["rows"]
    lines = [
        "# kl_gradients: which divergence's gradient each KL estimator gives", "",
        report.provenance(), "",
        f"Exact expectations by enumeration over the K categories (float64); q_old at"
        f" KL(q_old ‖ q) = {config.old_kl}. rel_bias_reverse = |E g - grad KL(q‖p)| /"
        " |grad KL(q‖p)|, rel_bias_forward the same against grad KL(p‖q)"
        " (over its norm), rel_std = sqrt(E|g - E g|^2) / |grad KL(q‖p)| for one"
        f" draw. `unbiased for`: a relative bias below {UNBIASED_TOL:g}.", "",
        "## The claims", "", report.markdown_table(results["claims"],
                                                  ("claim", "measured", "verdict")),
        "## Which gradient, per (estimator, mode, sampling)", "",
        "The same at every K and KL (the Gaussian rows: reparameterised, mode `loss`).", ""]
    summary = {}
    for r in rows:
        summary.setdefault((r["family"], r["estimator"], r["mode"], r["sampling"]),
                           set()).add(r["unbiased_for"])
    lines.append(report.markdown_table(
        [{"family": f, "estimator": e, "mode": m, "sampling": s,
          "unbiased for": "; ".join(sorted(v))} for (f, e, m, s), v in summary.items()],
        ("family", "estimator", "mode", "sampling", "unbiased for")))
    lines += ["## Every row", "", report.markdown_table(rows, COLUMNS)]
    if results["monte_carlo"]:
        lines += [f"Monte Carlo check (K = {config.mc_categories}, {config.mc_draws} draws per"
                  f" case, gradients by autodiff of each surrogate in the logits): the largest"
                  f" |measured - exact| / SE over all components and cases is"
                  f" {results['mc_max_abs_z']:.2f}."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Relative bias (reverse) and relative std against the KL, on-policy, per estimator and
    mode, for the largest K."""
    plt = report.pyplot()
    k_max = max(r["num_categories"] or 0 for r in rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for (estimator, mode), style in zip(
            [(e, m) for e in kl_lib.ESTIMATORS for m in MODES],
            [dict(color=c, ls=ls) for c in ("C0", "C1", "C2") for ls in ("-", "--", ":")]):
        sel = sorted((r for r in rows if r["num_categories"] == k_max and r["sampling"] ==
                      "on_policy" and (r["estimator"], r["mode"]) == (estimator, mode)),
                     key=lambda r: r["kl"])
        if not sel:
            continue
        kls = [r["kl"] for r in sel]
        axes[0].plot(kls, [max(r["rel_bias_reverse"], 1e-17) for r in sel], marker="o",
                     label=f"{estimator}, {mode}", **style)
        axes[1].plot(kls, [r["rel_std"] for r in sel], marker="o", **style)
    for ax, title in zip(axes, ("relative bias against grad KL(q‖p)",
                                "relative std of one draw")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("KL(q || p), nats")
        ax.set_title(f"{title} (categorical, K = {k_max}, z ~ q)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    report.save_figure(fig, path)
