"""The documentation cannot drift from the code: README's config table, configs/*.yaml and the defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastdqn.config import FIELDS, Config, from_dict, load_yaml, markdown_table

ROOT = Path(__file__).resolve().parents[1]
REGENERATE = "python -c 'from fastdqn.config import markdown_table; print(markdown_table())'"


def test_readme_config_table_matches_config():
    readme = (ROOT / "README.md").read_text()
    start, end = "<!-- config-table -->\n", "\n<!-- /config-table -->"
    assert start in readme and end in readme, "README.md lost its config-table markers"
    table = readme.split(start, 1)[1].split(end, 1)[0].strip()
    assert table == markdown_table(), f"README's config table is stale: paste the output of {REGENERATE}"


def test_cartpole_yaml_is_the_default_config():
    """`fastdqn train` (the defaults) and `--config configs/cartpole.yaml` must be the same run."""
    values = load_yaml(ROOT / "configs" / "cartpole.yaml")
    assert len(values) >= len(FIELDS) // 2, "configs/cartpole.yaml should spell out the recipe's keys"
    assert from_dict(values) == Config(), "configs/cartpole.yaml and the Config defaults disagree"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = from_dict(load_yaml(path), where=str(path))
    assert cfg.total_steps > 0
