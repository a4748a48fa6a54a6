"""The experiments, their config files, and what a config must hold to run.

`experiments()` lists what `config.experiment` may name, `config_files()` the config
files of this folder (each with its `PRESETS`), `field_docs(file)` the one-line comment
beside each field a config file sets, and `check(config)` what keeps a config from
running: one line per problem, each naming `--config.<field>`. A config is checked
against its experiment's default (the `get_config()` of the file here that makes that
experiment's config): no field unknown or missing, each of the default's type, and
the enumerated fields of `_choices` one of their values.
"""

import ast
import difflib
import importlib
import importlib.util
import inspect
import io
import tokenize
from pathlib import Path

import ml_collections

from vaekl import config as config_lib

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = REPO / "experiments"
TRAIN = "train"  # The experiment that `vaekl.train.train_and_evaluate` runs.


def experiments() -> dict[str, str]:
    """Name -> one line: "train" and each module of experiments/ (but main) with a `run`."""
    found = {TRAIN: "Train a VAE and evaluate it: vaekl.train.train_and_evaluate."}
    for path in sorted(EXPERIMENTS.glob("*.py")):
        tree = ast.parse(path.read_text())
        if path.stem != "main" and any(isinstance(node, ast.FunctionDef) and node.name == "run"
                                       for node in tree.body):
            found[path.stem] = (ast.get_docstring(tree) or "").split("\n")[0]
    return dict(sorted(found.items()))


def config_files() -> dict[str, object]:
    """experiments/configs/NAME.py -> its module, for each file here with a `get_config`."""
    modules = {}
    for path in sorted(Path(__file__).parent.glob("*.py")):
        module = importlib.import_module(f"experiments.configs.{path.stem}")
        if hasattr(module, "get_config"):
            modules[f"experiments/configs/{path.name}"] = module
    return modules


def defaults() -> dict[str, tuple[str, ml_collections.ConfigDict]]:
    """Experiment -> (its config file, that file's default config)."""
    found = {}
    for file, module in config_files().items():
        config = module.get_config()
        found[config.experiment] = (file, config)
    return found


def load(spec: str) -> tuple[str, ml_collections.ConfigDict]:
    """(file, config) of `--config=FILE.py[:PRESET]`, loaded as ml_collections does."""
    file, colon, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("experiments_config", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return file, module.get_config(*([arg] if colon else []))


def field_docs(file) -> dict[str, str]:
    """Field -> the comment on the line(s) where `get_config` of `file` sets it, in order
    (the fields of a group, `m.latents = 20  # ...`, by their own names)."""
    source = Path(file).read_text()
    if "def get_config(" not in source:  # A file that takes its config from the package.
        module_spec = importlib.util.spec_from_file_location("experiments_config", file)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        source = Path(inspect.getsourcefile(module.get_config)).read_text()
    comments = {tok.start[0]: tok.string.lstrip("#").strip() for tok in
                tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    get_config = next(node for node in ast.parse(source).body
                      if isinstance(node, ast.FunctionDef) and node.name == "get_config")
    returned = next(node.value.id for node in ast.walk(get_config)
                    if isinstance(node, ast.Return) and isinstance(node.value, ast.Name))
    docs, base = {}, {}
    for node in ast.walk(get_config):
        target = node.targets[-1] if isinstance(node, ast.Assign) else None
        if isinstance(target, ast.Name) and target.id == returned and _config_call(node.value):
            # `c = train.get_config(...)`: the fields it starts from keep that file's lines.
            base = field_docs(Path(__file__).parent / f"{_config_call(node.value)}.py")
        if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
            # `c.field = ...` or, in a group, `m.field = ...` and `m = c.model = ...`: keyed
            # by the field's own name (a train config's leaf names are unique).
            lines = [comments[i] for i in range(node.lineno, node.end_lineno + 1)
                     if i in comments]
            if lines:
                docs.setdefault(target.attr, lines[0])
    return {**base, **docs}


def _config_call(node) -> str | None:
    """The name of the config module in a call `<name>.get_config(...)`, else None."""
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get_config" and isinstance(node.func.value, ast.Name)
            and (Path(__file__).parent / f"{node.func.value.id}.py").exists()):
        return node.func.value.id
    return None


def field_lines(config, path: str, docs: dict) -> list[str]:
    """One line per field, `--<path>.<field>=<value>  <its comment>`, in the file's order;
    the fields of a sub-config follow its line, with the comments of its own file."""
    files = {experiment: file for experiment, (file, _) in defaults().items()}
    order = {key: i for i, key in enumerate(docs)}
    lines = []
    for key in sorted(config.keys(), key=lambda k: order.get(k, len(order))):
        value, flag = config[key], f"--{path}.{key}"
        if isinstance(value, ml_collections.ConfigDict) and len(value):
            file = files.get(value.get("experiment"))
            lines.append(f"  {flag + '.*':<48} {docs.get(key, '')}".rstrip())
            lines += field_lines(value, f"{path}.{key}", field_docs(REPO / file) if file else docs)
        else:
            shown = repr(value.to_dict() if hasattr(value, "to_dict") else value)
            shown = shown if len(shown) <= 40 else shown[:36] + " ..."
            lines.append(f"  {f'{flag}={shown}':<48} {docs.get(key, '')}".rstrip())
    return lines


def no_field(holder: str, key: str, known, file: str) -> str:
    """What to say of field `key` that `holder` (with fields `known`, from `file`) lacks."""
    group = config_lib.groups().get(key)
    if group and group in known:  # A train config's leaf under its flat (old) name.
        return (f"{holder} has no field {key!r}; it is {holder}.{group}.{key} (see the table"
                " of vaekl/config.py).")
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = (f"did you mean {close[0]!r}?" if close else
            f"`python -m experiments.main --help --config={file}` lists them.")
    return f"{holder} has no field {key!r}; {hint}"


def check(config) -> list[str]:
    """What keeps `config` from running, one line per problem naming `--config.<field>`."""
    known = experiments()
    name = config.get("experiment")
    if name not in known:
        return [f"--config.experiment: unknown experiment {name!r}; expected one of"
                f" {', '.join(known)}."]
    found = defaults()
    problems = _against(config, found[name][1], "config", found[name][0]) if name in found else []
    return problems or _enumerated(config, "config", _choices())


def _choices() -> dict[str, dict[str, tuple]]:
    """Experiment -> {field: allowed values (of each element, for a tuple field)}.

    The enumerated fields that would otherwise fail inside a run under another name;
    train's kl, optimizer, ... `vaekl.train` checks as config fields itself.
    """
    from experiments import main_job  # Lazy: --help does without JAX.
    from vaekl import data, kl
    from vaekl.distributions import DiagNormal

    gaussian_terms = kl.terms(DiagNormal, DiagNormal)  # Both train a diagonal Gaussian q.
    return {TRAIN: {"data.dataset": data.NAMES},
            "estimators": {"estimators": kl.ESTIMATORS},
            "gradient_variance": {"estimators": gaussian_terms},
            "compare_training": {"kls": gaussian_terms},
            "main_job": {"parts": tuple(main_job.TABLES)}}


def _fits(value, default, field_type) -> bool:
    """Whether `value` may stand where the default config holds `default` of `field_type`."""
    if value is None:
        return default is None  # A placeholder.
    if isinstance(value, bool) != (field_type is bool):
        return False
    if field_type is float:
        return isinstance(value, (int, float))
    if field_type in (list, tuple):
        return isinstance(value, (list, tuple))
    return isinstance(value, field_type)


def _some(fields: list) -> str:
    """`fields` named, the first five of them when there are more."""
    named = ", ".join(fields[:5]) + (f", ... ({len(fields)} in all)" if len(fields) > 5 else "")
    return f"the field{'s' if len(fields) > 1 else ''} {named}"


def _against(config, default, path: str, file: str) -> list[str]:
    """Problems of `config` (at `path`) against `default` (from config file `file`)."""
    unknown = [k for k in config.keys() if k not in default]
    missing = [k for k in default.keys() if k not in config]
    if missing:  # A config made for another experiment, most likely.
        extra = f" and has {_some(unknown)}, which it does not" if unknown else ""
        return [f"--{path}: lacks {_some(missing)} of experiment {default.get('experiment')!r}"
                f"'s config ({file}){extra}; start from that file."]
    problems = [f"--{path}.{key}: {no_field(path, key, default.keys(), file)}"
                for key in unknown]
    for key in default.keys():
        value, want = config[key], default[key]
        if isinstance(want, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                problems.append(f"--{path}.{key}: expected a ConfigDict, got {value!r}.")
            elif len(want):  # An empty default (data_options) takes any fields.
                problems += _against(value, want, f"{path}.{key}", file)
        elif not _fits(value, want, default.get_type(key)):
            problems.append(f"--{path}.{key}: expected {default.get_type(key).__name__},"
                            f" got {value!r}.")
    return problems


def _enumerated(config, path: str, choices: dict) -> list[str]:
    """Problems of the enumerated fields of `config` and of its sub-configs."""
    problems = []
    for field, allowed in choices.get(config.get("experiment"), {}).items():
        value = config
        for key in field.split("."):  # A dotted field is one of a group ("data.dataset").
            value = value.get(key)
        values = value if isinstance(value, (list, tuple)) else (value,)
        bad = [v for v in values if v not in allowed]
        if bad:
            problems.append(f"--{path}.{field}: unknown value{'s' if len(bad) > 1 else ''}"
                            f" {', '.join(map(repr, bad))}; expected"
                            f" {'each to be ' if values is value else ''}one of"
                            f" {', '.join(allowed)}.")
    for key in config.keys():
        if isinstance(config[key], ml_collections.ConfigDict):
            problems += _enumerated(config[key], f"{path}.{key}", choices)
    return problems
