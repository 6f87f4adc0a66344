"""Every configuration key is a real option with its help beside its field, and docs/configuration.md is current."""

import dataclasses
from pathlib import Path

import pytest

from coordinator.config import CoordinatorConfig
from edge_node.config import NodeConfig
from shared.config import reference

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


@pytest.mark.parametrize("config", [CoordinatorConfig, NodeConfig], ids=["coordinator", "node"])
def test_every_key_has_a_one_line_help_and_there_are_at_most_25(config):
    keys = [(section, f) for section, kind in config.SECTIONS.items() for f in dataclasses.fields(kind)]
    missing = [f"[{s}] {f.name}" for s, f in keys if not f.metadata.get("help", "").strip()]
    assert not missing, f"keys without help: {missing}"
    assert all("\n" not in f.metadata["help"] for _, f in keys)
    assert len(keys) <= 25, [f"[{s}] {f.name}" for s, f in keys]


def test_the_configuration_reference_is_generated_and_current():
    assert DOC.read_text() == reference(), "docs/configuration.md is stale: python -m shared.config > docs/configuration.md"
