"""Presets: the argument a config file takes after its name (`--config=FILE.py:PRESET`).

Each config file names its presets in a module-level `PRESETS` dict (name -> one line),
which its `get_config` checks the argument against with `check` and which
`python -m experiments.main --help` lists, so the two cannot disagree.
"""

from vaekl.config import UnknownPresetError  # The one such error, train's too.

QUICK = {"quick": "seconds to a few minutes: tests and smoke runs"}


def check(config_name: str, arg, presets: dict) -> str:
    """The preset `arg` names ("" for no argument); any other name is refused by name."""
    if arg in (None, ""):
        return ""
    if arg not in presets:
        raise UnknownPresetError(f"{config_name} config: unknown preset {arg!r}; expected one"
                                 f" of {', '.join(presets)} or none.")
    return arg
