"""vaekl.config: the nested layout, its old -> new table, and the conversions of the flat one."""

import re

import pytest

from vaekl import config as vaekl_config


@pytest.mark.parametrize("preset", [None, *vaekl_config.PRESETS])
def test_leaf_names_are_unique_and_no_group_is_named_like_a_leaf(preset):
    config = vaekl_config.get_config(preset)
    names = [leaf for group in vaekl_config.GROUPS for leaf in config[group]]
    names += [k for k in config if k not in vaekl_config.GROUPS]
    assert len(names) == len(set(names))
    assert not set(names) & set(vaekl_config.GROUPS)
    assert set(config) - {"experiment"} == set(vaekl_config.GROUPS)


def test_the_docstring_table_names_each_old_field_in_its_group():
    """Each name of vaekl/config.py's old -> new table is a leaf of its group, each group has
    its row, and every field of the config is in the table once."""
    rows, group = {}, None
    table = vaekl_config.__doc__.split("group    old flat names")[1].split("\n\n")[0]
    for line in table.splitlines()[1:]:
        head = re.match(r"  (\w+) ", line)
        group = head.group(1) if head else group
        rows.setdefault(group, set()).update(re.findall(r"\b(\w+)(?:,|$| +\()", line.strip()))
    assert set(rows) == set(vaekl_config.GROUPS) | {"top"}
    where = vaekl_config.groups()
    for group, names in rows.items():
        for name in names:
            assert where[name] == ("" if group == "top" else group), (name, group)
    assert sum(map(len, rows.values())) == len(where) == len(set().union(*rows.values()))


def test_flat_and_nested_convert_both_ways():
    config = vaekl_config.get_config("flax").to_dict()
    flat = vaekl_config.leaves(config)
    assert flat["kl"] == "analytic" and flat["num_epochs"] == 10 and "loss" not in flat
    assert vaekl_config.nest(flat) == config
    assert vaekl_config.leaves(flat) == flat  # The flat layout of before reads the same.
    assert vaekl_config.nest({"kl": "k3", "zzz": 1}) == {"loss": {"kl": "k3"}, "zzz": 1}
