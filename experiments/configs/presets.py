"""The `quick` switch that every experiment config takes after its file name."""


def is_quick(config_name: str, arg) -> bool:
    """True for "quick", False for no argument; any other preset is refused by name."""
    if arg not in (None, "", "quick"):
        raise ValueError(f"{config_name} config: unknown preset {arg!r}; expected quick or none.")
    return arg == "quick"
