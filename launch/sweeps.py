"""Sweeps as Python data: combinators of config overrides, and the registry `SWEEPS`.

A sweep is a config file (with an optional `:arg`) and a list of override dicts,
one per run. The combinators build those lists:

  product(**{"loss.kl": ["analytic", "k3"], "train.seed": [0, 1]})  # 4 runs: every combination
  zip_(**{"model.latents": [2, 50], "model.hidden": [(50,), (400,)]})  # 2: element-wise pairs
  chain(product(**{"loss.kl": ["k1"]}), [{"loss.kl": "k3", "loss.beta": 0.5}])  # one, then other
  product(zip_(**{"model.latents": [2, 50]}), **{"train.seed": [0, 1]})  # sweeps cross too

Fields are full paths of the nested config (`loss.kl`). Each run is named from its
overrides by their leaf names, keys sorted, e.g. `kl=k3,num_samples=5,seed=1`:
the name is its directory under the sweep's root, so it must stay stable between
invocations (that is what makes a sweep resumable). `Sweep.fixed` holds overrides
shared by every run; they are passed to each run but not part of its name.
"""

import dataclasses
import hashlib
import importlib.util
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

Overrides = dict[str, Any]

_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")
_MAX_NAME = 200


def product(*sweeps: Iterable[Overrides], **fields: Sequence[Any]) -> list[Overrides]:
    """Every combination of the given sweeps and field values (the first varies slowest).

    Args:
      *sweeps: lists of override dicts, crossed with each other.
      **fields: field name -> list of values; each is a one-field sweep.

    Returns:
      A list of override dicts.

    Raises:
      TypeError: when a field's values are not a list (e.g. a bare string).
      ValueError: when a field has no values or two factors set the same field.
    """
    runs = [{}]
    for factor in [list(s) for s in sweeps] + [_field_sweep(k, v) for k, v in fields.items()]:
        runs = [_merge(a, b) for a in runs for b in factor]
    return runs


def zip_(*sweeps: Iterable[Overrides], **fields: Sequence[Any]) -> list[Overrides]:
    """Element-wise pairs of the given sweeps and field values, which must be equally long.

    Raises:
      ValueError: when the lengths differ or two factors set the same field.
    """
    factors = [list(s) for s in sweeps] + [_field_sweep(k, v) for k, v in fields.items()]
    lengths = {len(f) for f in factors}
    if len(lengths) > 1:
        raise ValueError(f"zip_: expected sweeps of one length, got lengths "
                         f"{[len(f) for f in factors]}.")
    runs = []
    for parts in zip(*factors):
        merged = {}
        for part in parts:
            merged = _merge(merged, part)
        runs.append(merged)
    return runs


def chain(*sweeps: Iterable[Overrides]) -> list[Overrides]:
    """The runs of each sweep, one sweep after the other."""
    return [dict(run) for s in sweeps for run in s]


def _field_sweep(field: str, values: Sequence[Any]) -> list[Overrides]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"sweep field {field!r}: expected a list of values, got {values!r}.")
    values = list(values)
    if not values:
        raise ValueError(f"sweep field {field!r}: expected at least one value, got none.")
    return [{field: v} for v in values]


def _merge(a: Overrides, b: Overrides) -> Overrides:
    shared = sorted(set(a) & set(b))
    if shared:
        raise ValueError(f"sweep: field(s) {shared} set by two factors of one run.")
    return {**a, **b}


def format_value(value: Any) -> str:
    """The command-line text of an override value, as ml_collections' config_flags parses it.

    Tuples and lists are written as Python tuple literals, e.g. `(200, 200)` or `('k1', 'k3')`.

    Raises:
      ValueError: for a type config_flags cannot override (None, dicts, objects).
    """
    if isinstance(value, (tuple, list)):
        for v in value:
            format_value(v)
        return repr(tuple(value))
    if isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, str):
        return value
    raise ValueError(f"override value {value!r}: expected str, int, float, bool or a tuple of"
                     f" them, got {type(value).__name__}.")


# The train config's fields whose value is a dict of their own (vaekl/config.py), written out
# because launch imports neither vaekl nor JAX; tests/launch_test.py fails if they differ.
DICT_LEAVES = ("data_options",)


def leaf(field: str) -> str:
    """The leaf name of a field: `loss.kl` -> `kl`; inside a dict-valued field, the path from
    that field on: `data.data_options.obs_dim` -> `data_options.obs_dim`."""
    parts = field.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in DICT_LEAVES:
            return ".".join(parts[i:])
    return parts[-1]


def leaves(config: Mapping[str, Any]) -> dict:
    """A config, nested (`{"loss": {"kl": "k3"}}`) or dotted (`{"loss.kl": "k3"}`), keyed by
    its fields' leaf names (`{"kl": "k3"}`); a leaf name that two fields share keeps their
    dotted paths. A train config's leaf names are unique (vaekl/config.py), so its flat
    layout of before (config.json and overrides `{"kl": "k3"}`) reads the same."""
    dotted = {}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, Mapping) and v:
                walk(v, f"{prefix}{k}.")
            else:
                dotted[f"{prefix}{k}"] = v

    walk(config, "")
    count = {}
    for k in dotted:
        count[leaf(k)] = count.get(leaf(k), 0) + 1
    return {(leaf(k) if count[leaf(k)] == 1 else k): v for k, v in dotted.items()}


def run_name(overrides: Mapping[str, Any]) -> str:
    """The directory name of a run: `key=value` pairs, keys sorted, joined by commas.

    Keys are leaf names (`loss.kl=k3` is named `kl=k3`): the names of runs stay those of
    the flat config of before, so that a sweep's committed runs are found again.

    Characters outside [A-Za-z0-9._+-] in values become `_`; tuple elements are joined
    by `_`. Names longer than 200 characters are cut and end in a hash of the full name.
    A run without overrides is named `base`.
    """
    if not overrides:
        return "base"
    overrides = leaves(overrides)
    name = ",".join(f"{k}={_name_value(overrides[k])}" for k in sorted(overrides))
    if len(name) > _MAX_NAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:12]
        name = f"{name[:_MAX_NAME - 13]}-{digest}"
    return name


def _name_value(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "_".join(_name_value(v) for v in value)
    return _UNSAFE.sub("_", format_value(value))


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A config file and the overrides of each of its runs.

    Attributes:
      config: the config file, relative to the repository root, with an optional `:arg`
        (e.g. `experiments/configs/train.py:quick`).
      runs: one dict of config overrides per run (field -> value).
      fixed: overrides passed to every run, left out of the run names.
      description: one line for `--status` and listings.
    """

    config: str
    runs: Sequence[Overrides]
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    description: str = ""

    def __post_init__(self):
        if not self.runs:
            raise ValueError(f"Sweep({self.config!r}): expected at least one run, got none.")
        for overrides in [self.fixed, *self.runs]:
            for field, value in overrides.items():
                if not _FIELD.match(field):
                    raise ValueError(f"sweep field {field!r}: expected a config field name such"
                                     " as 'kl' or 'model.latents'.")
                format_value(value)
        for overrides in self.runs:
            shared = sorted(set(overrides) & set(self.fixed))
            if shared:
                raise ValueError(f"Sweep({self.config!r}): field(s) {shared} are both swept and"
                                 " fixed.")
        self.named_runs()

    def named_runs(self) -> list[tuple[str, Overrides]]:
        """(name, overrides) per run, in sweep order.

        Raises:
          ValueError: when two runs get the same name.
        """
        named, seen = [], {}
        for overrides in self.runs:
            name = run_name(overrides)
            if name in seen:
                raise ValueError(f"Sweep({self.config!r}): runs {seen[name]} and {overrides}"
                                 f" have the same name {name!r}.")
            seen[name] = overrides
            named.append((name, dict(overrides)))
        return named


_KL_TERMS = ["analytic", "k1", "k3", "stl"]
_DIGITS = {"data.dataset": "digits"}
_TINY_ESTIMATORS = {"num_draws": 2000, "schulman_draws": 2000, "histogram_draws": 2000}


def _burda_rows() -> list[Overrides]:
    """The study's rows at K <= 5 (Burda et al.'s protocol): VAE k = 1 with each KL term over
    3 seeds, VAE and IWAE (reparam, STL, DReG) k = 5 over 2."""
    vae1 = product(**{"loss.kl": _KL_TERMS, "loss.objective": ["elbo"], "loss.num_samples": [1],
                      "train.num_seeds": [3]})
    vae5 = [{"loss.kl": "analytic", "loss.objective": "elbo", "loss.num_samples": 5,
             "train.num_seeds": 2}]
    iwae5 = product(**{"loss.objective": ["iwae"], "loss.num_samples": [5],
                       "loss.grad_estimator": ["reparam", "stl", "dreg"], "train.num_seeds": [2]})
    return chain(vae1, vae5, iwae5)


def _burda_k50_rows() -> list[Overrides]:
    """The study's K = 50 rows, VAE and IWAE (reparam, DReG), 2 seeds: a sweep of their own
    under `short`, so that rerunning `burda_short` never starts hours of K = 50 training."""
    return chain([{"loss.kl": "analytic", "loss.objective": "elbo", "loss.num_samples": 50,
                   "train.num_seeds": 2}],
                 product(**{"loss.objective": ["iwae"], "loss.num_samples": [50],
                            "loss.grad_estimator": ["reparam", "dreg"], "train.num_seeds": [2]}))


def _categorical_rows() -> list[Overrides]:
    """Issue 24's categorical VAE rows, 3 seeds each in one program: Gumbel-softmax and
    straight-through Gumbel, each with the categorical KL ("analytic") and the relaxed
    densities' ("relaxed"), and the score-function gradient with "analytic" and "k1"."""
    return chain(product(**{"loss.categorical_gradient": ["gumbel", "st_gumbel"],
                            "loss.kl": ["analytic", "relaxed"], "train.num_seeds": [3]}),
                 product(**{"loss.categorical_gradient": ["score"], "loss.kl": ["analytic", "k1"],
                            "train.num_seeds": [3]}))


# The KL terms of each (posterior, prior) pair of `no_closed_form`: what `vaekl.kl.terms` answers
# for the pair's classes (`vaekl.models.pair_types`), written out because launch imports neither
# vaekl nor JAX; tests/no_closed_form_test.py fails if the two ever differ.
NO_CLOSED_FORM_TERMS = {
    ("diag", "standard"): ["analytic", "k1", "k3", "stl", "entropy"],
    ("diag", "vamp"): ["k1", "k3", "stl", "entropy"],
    ("full", "standard"): ["analytic", "k1", "k3", "stl", "entropy"],
    ("full", "vamp"): ["k1", "k3", "stl", "entropy"],
    ("iaf", "standard"): ["k1", "k3", "stl"],
    ("iaf", "vamp"): ["k1", "k3", "stl"],
}

SWEEPS: dict[str, Sweep] = {
    "smoke": Sweep(
        config="experiments/configs/train.py:quick",
        runs=product(**{"loss.kl": _KL_TERMS, "train.seed": [0, 1]}),
        fixed=_DIGITS,
        description="a few seconds per run: every KL term x 2 seeds on digits"),
    "compare_training": Sweep(
        config="experiments/configs/train.py",
        runs=product(**{"loss.kl": _KL_TERMS, "loss.num_samples": [1, 5],
                        "train.seed": [0, 1, 2]}),
        fixed=_DIGITS,
        description="KL term x samples per step x 3 seeds on digits"),
    "latents": Sweep(
        config="experiments/configs/train.py",
        runs=product(**{"model.latents": [2, 5, 10, 20, 50], "train.seed": [0, 1, 2]}),
        fixed=_DIGITS,
        description="latent dimension x 3 seeds on digits (analytic KL)"),
    "estimators_smoke": Sweep(
        config="experiments/configs/estimators.py:quick",
        runs=product(seed=[0, 1]),
        fixed=_TINY_ESTIMATORS,
        description="the estimator experiment with 2000 draws per case, 2 seeds"),
    "burda_full": Sweep(
        config="experiments/configs/burda.py:full",
        runs=chain(_burda_rows(), _burda_k50_rows()),
        description="the study, Burda et al.'s 3,280 epochs on mnist (days of CPU per row)"),
    "burda_short": Sweep(
        config="experiments/configs/burda.py:short",
        runs=_burda_rows(),
        description="the study's K <= 5 rows, 40 epochs (the schedule's first 4 stages) on"
                    " mnist: about 4 hours of 2 CPU cores"),
    "burda_short_k50": Sweep(
        config="experiments/configs/burda.py:short",
        runs=_burda_k50_rows(),
        description="the study's K = 50 rows, 40 epochs on mnist (hours of CPU per row)"),
    "no_closed_form": Sweep(
        config="experiments/configs/train.py:quick",
        runs=chain(*[product(**{"model.posterior": [q], "model.prior": [p], "loss.kl": terms})
                     for (q, p), terms in NO_CLOSED_FORM_TERMS.items()]),
        fixed={**_DIGITS, "model.num_pseudo_inputs": 50, "model.iaf_hidden": (64,),
               "model.iaf_context": 8},
        description="every posterior family x prior (standard, VampPrior) x the KL terms the"
                    " pair allows, seconds each on digits"),
    "categorical_vae": Sweep(
        config="experiments/configs/train.py:categorical",
        runs=_categorical_rows(),
        description="Jang et al.'s categorical VAE on mnist (30 x 10 latents, 50,400 steps):"
                    " Gumbel, ST-Gumbel x KL analytic/relaxed, score function x analytic/k1,"
                    " 3 seeds each"),
    "burda_quick": Sweep(
        config="experiments/configs/burda.py:quick",
        runs=_burda_rows(),
        description="the study's rows for seconds each on digits (tests)"),
}


def get(name: str) -> Sweep:
    """The sweep `name` from `SWEEPS`, or `FILE.py:NAME`, a `Sweep` defined in a Python file.

    Raises:
      ValueError: naming `--sweep` and the known sweeps when `name` is not one.
    """
    if name in SWEEPS:
        return SWEEPS[name]
    path, sep, attr = name.rpartition(":")
    if sep and path.endswith(".py"):
        return _from_file(Path(path), attr)
    raise ValueError(f"--sweep: unknown sweep {name!r}; expected one of {', '.join(SWEEPS)}"
                     " or FILE.py:NAME for a Sweep defined in a file.")


def _from_file(path: Path, attr: str) -> Sweep:
    if not path.is_file():
        raise ValueError(f"--sweep: no file {str(path)!r}.")
    spec = importlib.util.spec_from_file_location(f"_sweeps_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    found = {k: v for k, v in vars(module).items() if isinstance(v, Sweep)}
    if attr not in found:
        raise ValueError(f"--sweep: {str(path)!r} has no Sweep named {attr!r}; it defines"
                         f" {list(found) or 'none'}.")
    return found[attr]

