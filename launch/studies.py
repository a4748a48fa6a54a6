"""The studies `launch.study` tabulates: what differs between them, one `Study` each.

A study is a registered sweep family whose runs answer one question row by row (e.g.
analytic vs sampled KL with Burda et al.'s protocol). `launch.study` makes every study's
table with the same code (seeds' mean ± std, SE over the test images, seed-by-seed
differences, rows not run yet); a `Study` says which runs belong to it (the config they
were made from), how a run's config maps to a row, which figures head the table, which
pairs of rows are differenced, and which published figures, if any, may stand beside a
row. `STUDIES` lists them. This module imports nothing heavy (no vaekl, no JAX).
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple


class Reference(NamedTuple):
    """A published source whose figures may stand beside a study's rows."""
    column: str  # The row field and CSV column of its figure (negated); `diff_COLUMN` beside.
    name: str  # As the table names it: "Burda" (its column "Δ Burda").
    header: str  # Its figure's column in the markdown table.
    protocol: str  # How its figures were measured, one sentence.
    legend: str  # Its markers' legend in the plot.


@dataclass(frozen=True)
class Study:
    """What one study's table needs that another's does not.

    `config` matches launch.json's `config` of a run: a bare path (`burda.py`) matches the
    file with any preset, `path:preset` that preset only. `columns` are the headline
    figures: (header, row field[, digits]); a field with a seed summary (`METRIC` of
    `metrics`) shows as mean ± std, any other (`METRIC_se`) as one figure; `{k}` in a header
    is the IWAE K of evaluation. `pairs` are (label, row key a, row key b), differenced
    seed by seed in `pair_metric` (a key of per_example.npz, `test_` + it in results).
    """
    name: str
    config: str
    title: str
    key_fields: tuple[str, ...]  # The row key's parts, as row fields and CSV columns.
    row_key: Callable[[Mapping], tuple]
    label: Callable[[tuple], str]
    order: Callable[[tuple], tuple]  # The sort key of row keys.
    row_fields: frozenset[str]  # The leaves a run may override and stay in the table.
    describe: str  # What was run: a template of {epochs}, {s}, {data}, {ks}, {images}.
    notes: str  # Sentences after the intro's: what the columns measure ("" for none).
    metrics: tuple[str, ...]  # Summarised over the seeds: METRIC_mean, METRIC_std.
    columns: tuple[tuple, ...]
    csv_columns: tuple[str, ...]
    pairs: tuple[tuple[str, tuple, tuple], ...]
    pair_metric: str
    pair_text: str  # The pair metric as the differences' sentence names it.
    plot_metric: str
    plot_label: str  # The plot's x axis: a template of {ks}.
    no_published: str  # Why no published figure stands beside the rows, one clause.
    references: tuple[Reference, ...] = ()
    published: Callable[[tuple], dict] = lambda key: {}  # Reference column -> its NLL.
    measured_as_published: Callable[[Mapping], bool] = lambda row: False
    published_note: str = ""  # Beside the published columns: {protocols}, {epochs}.

    def matches(self, config: str) -> bool:
        """Whether a run made from `config` (launch.json's `config`) belongs to the study."""
        return config == self.config or config.split(":")[0] == self.config


# --- The Burda study: analytic vs sampled KL, IWAE vs VAE, DReG vs reparam. ---

# Burda, Grosse & Salakhutdinov (2015), Table 1, MNIST, one stochastic layer, test NLL from
# the k = 5000 bound after 3,280 epochs (as quoted by the nbip/IWAE README; ../shared/
# REFERENCES.md). Keys: (objective, K).
BURDA = {("elbo", 1): 86.76, ("elbo", 5): 86.47, ("elbo", 50): 86.35,
         ("iwae", 5): 85.54, ("iwae", 50): 84.78}
# The nbip/IWAE TF2 reproduction (same net, batch and schedule): standard gradients and DReG.
NBIP = {("iwae", 1, "reparam"): 86.35, ("iwae", 5, "reparam"): 85.18,
        ("iwae", 50, "reparam"): 84.59, ("iwae", 1, "dreg"): 86.08,
        ("iwae", 5, "dreg"): 84.90, ("iwae", 50, "dreg"): 84.32}
PUBLISHED_DATASET, PUBLISHED_EVAL_K, PUBLISHED_TEST_EXAMPLES = "mnist", 5000, 10000
VAE1 = ("elbo", 1)


def burda_row_key(config: Mapping) -> tuple:
    """(objective, K, KL term or None, gradient estimator or None) of a run's config."""
    if config["objective"] == "elbo":
        return ("elbo", config["num_samples"], config["kl"], None)
    return (config["objective"], config["num_samples"], None, config["grad_estimator"])


def burda_label(key: tuple) -> str:
    objective, k, kl, estimator = key
    if objective == "elbo":
        return f"VAE k={k}, KL {kl}"
    return f"{objective.upper()} k={k}, {estimator}"


def burda_published(key: tuple) -> dict:
    """The published NLLs of a row: Burda's (standard gradients, the VAE's analytic KL) and
    nbip's (IWAE by estimator; IWAE k = 1 is the VAE)."""
    burda = BURDA.get(key[:2]) if key[2] in (None, "analytic") and key[3] != "stl" else None
    nbip = NBIP.get((key[0], key[1], key[3])) if key[0] == "iwae" else None
    if key[:3] == (*VAE1, "analytic"):
        nbip = NBIP[("iwae", 1, "reparam")]
    return {"burda": burda, "nbip": nbip}


def burda_measured_as_published(row: Mapping) -> bool:
    """Whether the row was measured as the published figures were (data, K, test set)."""
    return (row["dataset"] == PUBLISHED_DATASET and row["eval_k"] == PUBLISHED_EVAL_K
            and row["test_examples"] == PUBLISHED_TEST_EXAMPLES)


BURDA_STUDY = Study(
    name="burda",
    config="experiments/configs/burda.py",
    title="## The study: analytic vs sampled KL, IWAE vs VAE, DReG vs reparam",
    key_fields=("objective", "num_samples", "kl", "grad_estimator"),
    row_key=burda_row_key,
    label=burda_label,
    order=lambda k: (k[0] != "elbo", k[1], k[0], str(k[2]), str(k[3])),
    row_fields=frozenset({"kl", "objective", "num_samples", "grad_estimator", "num_seeds",
                          "seed"}),
    describe="{epochs} epoch{s} of Burda's schedule on `{data}`, scored by the IWAE-{ks} bound"
             " of {images} test images",
    notes="",
    metrics=("test_log_likelihood", "test_elbo", "test_rate", "active_units"),
    columns=(("test log-lik.", "test_log_likelihood"), ("SE", "test_log_likelihood_se"),
             ("test ELBO", "test_elbo"), ("rate", "test_rate"),
             ("active units", "active_units", 1)),
    csv_columns=(
        "row", "objective", "num_samples", "kl", "grad_estimator", "protocol_epochs", "n",
        "test_log_likelihood_mean", "test_log_likelihood_std", "test_elbo_mean", "test_elbo_std",
        "test_rate_mean", "active_units_mean", "burda", "diff_burda", "nbip", "diff_nbip",
        "train_wall_s",
        # Added after the first table; the columns above keep their names.
        "dataset", "eval_k", "test_examples", "test_log_likelihood_se", "test_elbo_se",
        "test_rate_std", "active_units_std", "steps_per_s", "eval_wall_s", "code", "host"),
    pairs=(
        ("analytic − k1 (VAE k=1)", ("elbo", 1, "analytic", None), ("elbo", 1, "k1", None)),
        ("stl − k1 (VAE k=1)", ("elbo", 1, "stl", None), ("elbo", 1, "k1", None)),
        ("k3 − k1 (VAE k=1)", ("elbo", 1, "k3", None), ("elbo", 1, "k1", None)),
        ("IWAE − VAE (k=5)", ("iwae", 5, None, "reparam"), ("elbo", 5, "analytic", None)),
        ("DReG − reparam (IWAE k=5)", ("iwae", 5, None, "dreg"), ("iwae", 5, None, "reparam")),
        ("STL − reparam (IWAE k=5)", ("iwae", 5, None, "stl"), ("iwae", 5, None, "reparam")),
    ),
    pair_metric="log_likelihood",
    pair_text="test log-likelihood",
    plot_metric="test_log_likelihood",
    plot_label="test log-likelihood, IWAE-{ks} (nats, higher is better)",
    no_published="theirs are on mnist by IWAE-5000 on all 10,000 test images.",
    references=(
        Reference("burda", "Burda", "Burda (3,280 ep.)",
                  "Burda et al. 2015, Table 1: 3,280 epochs, 59,600 training images, IWAE-5000"
                  " test bound, standard (reparameterised) gradients",
                  "burda, converged (3,280 epochs)"),
        Reference("nbip", "nbip", "nbip (3,280 ep.)",
                  "the nbip/IWAE TF2 reproduction of Burda's protocol (3,280 epochs), with"
                  " standard gradients and with DReG", "nbip, converged (3,280 epochs)"),
    ),
    published=burda_published,
    measured_as_published=burda_measured_as_published,
    published_note=(
        " Published columns (negated NLLs): {protocols} Δ = measured − published. **They are"
        " converged figures after 3,280 epochs; these rows trained {epochs}**, so Δ measures"
        " the budget as much as the method: the rows rank the methods at equal budget and do"
        " not reproduce the published numbers."),
)

# --- The categorical study: Jang et al.'s categorical VAE, gradient x KL term. ---

GRADIENTS = {"gumbel": "Gumbel-softmax", "st_gumbel": "ST Gumbel-softmax",
             "score": "score function"}
CATEGORICAL_KLS = ("analytic", "relaxed", "k1")


def categorical_row_key(config: Mapping) -> tuple:
    """(gradient of the categorical samples, KL term) of a run's config."""
    return (config["categorical_gradient"], config["kl"])


def _rank(value, known) -> tuple:
    """Sorts `known` values in their order, then any other by name."""
    return (known.index(value) if value in known else len(known), str(value))


CATEGORICAL_STUDY = Study(
    name="categorical",
    config="experiments/configs/train.py:categorical",
    title="## The categorical study: Gumbel-softmax, ST Gumbel-softmax and the score function,"
          " categorical vs relaxed KL",
    key_fields=("categorical_gradient", "kl"),
    row_key=categorical_row_key,
    label=lambda key: f"{GRADIENTS.get(key[0], key[0])}, KL {key[1]}",
    order=lambda k: (*_rank(k[0], tuple(GRADIENTS)), *_rank(k[1], CATEGORICAL_KLS)),
    row_fields=frozenset({"categorical_gradient", "kl", "num_seeds", "seed"}),
    describe="{epochs} epoch{s} of Jang et al.'s categorical VAE on `{data}`, scored with hard"
             " samples on {images} test images",
    notes=(" The latents are 30 one-hot blocks of 10 under a uniform prior; whatever KL term"
           " trained a row, `discrete test ELBO` is the discrete model's (hard one-hot samples,"
           " exact categorical KL) and `IWAE-K` its importance-weighted log-likelihood bound"
           " with hard samples. In training (the `categorical` preset of"
           " experiments/configs/train.py): Gumbel-softmax samples at temperature"
           " τ = max(exp(−3e-5 · step), 0.5), updated every 1000 steps, ST = hard one-hot"
           " forward and the relaxed gradient; `KL analytic` is the exact categorical KL of q's"
           " logits, `KL relaxed` the sampled log-ratio of the relaxed densities of q and of the"
           " prior, the prior at q's τ (config.loss.prior_temperature = 0); the score function"
           " is REINFORCE with a baseline, the bias-corrected moving average (decay 0.99) of past"
           " steps' batch-mean ELBO."),
    metrics=("test_elbo", "test_log_likelihood", "test_rate", "test_distortion"),
    columns=(("discrete test ELBO", "test_elbo"), ("SE", "test_elbo_se"),
             ("IWAE-{k} log-lik.", "test_log_likelihood"), ("SE", "test_log_likelihood_se"),
             ("rate", "test_rate")),
    csv_columns=(
        "row", "categorical_gradient", "kl", "protocol_epochs", "n", "test_elbo_mean",
        "test_elbo_std", "test_elbo_se", "test_log_likelihood_mean", "test_log_likelihood_std",
        "test_log_likelihood_se", "test_rate_mean", "test_rate_std", "test_distortion_mean",
        "test_distortion_std", "dataset", "eval_k", "test_examples", "steps_per_s",
        "train_wall_s", "eval_wall_s", "code", "host"),
    pairs=(
        ("relaxed − analytic (Gumbel-softmax)", ("gumbel", "relaxed"), ("gumbel", "analytic")),
        ("relaxed − analytic (ST Gumbel-softmax)", ("st_gumbel", "relaxed"),
         ("st_gumbel", "analytic")),
        ("ST − plain Gumbel-softmax (KL analytic)", ("st_gumbel", "analytic"),
         ("gumbel", "analytic")),
        ("k1 − analytic (score function)", ("score", "k1"), ("score", "analytic")),
        ("score function − Gumbel-softmax (KL analytic)", ("score", "analytic"),
         ("gumbel", "analytic")),
    ),
    pair_metric="elbo",
    pair_text="discrete test ELBO",
    plot_metric="test_elbo",
    plot_label="discrete test ELBO, hard samples (nats, higher is better)",
    no_published=("Jang, Gu & Poole (2017, arXiv:1611.01144) Table 2 could not be read here,"
                  " and the ~101.5 quoted elsewhere for their Gumbel-softmax VAE is"
                  " unverified."),
)

STUDIES = (BURDA_STUDY, CATEGORICAL_STUDY)
