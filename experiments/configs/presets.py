"""Presets: the argument a config file takes after its name (`--config=FILE.py:PRESET`).

Each config file names its presets in a module-level `PRESETS` dict (name -> one line),
which its `get_config` checks the argument against with `check` and which
`python -m experiments.main --help` lists, so the two cannot disagree.
"""

QUICK = {"quick": "seconds to a few minutes: tests and smoke runs"}


class UnknownPresetError(LookupError):
    """An argument after the config file's name that is none of the file's presets.

    A LookupError rather than a ValueError: ml_collections rewraps a ValueError raised
    by `get_config` into one that carries its traceback as text, while this one reaches
    experiments.main as it was raised, to be printed as one line.
    """


def check(config_name: str, arg, presets: dict) -> str:
    """The preset `arg` names ("" for no argument); any other name is refused by name."""
    if arg in (None, ""):
        return ""
    if arg not in presets:
        raise UnknownPresetError(f"{config_name} config: unknown preset {arg!r}; expected one"
                                 f" of {', '.join(presets)} or none.")
    return arg
