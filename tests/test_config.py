from pathlib import Path

import pytest

from nlsr.config import ConfigError, ExperimentConfig, config_hash, load_config, stable_hash

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"default.yaml", "smoke.yaml", "paper.yaml"} <= names


@pytest.mark.parametrize("path", [p for p in CONFIGS if "grids" not in p.parts], ids=lambda p: p.name)
def test_every_experiment_config_validates(path):
    overrides = ["model.path=/m/llama3-8b", "evaluation.judge_path=/m/beaver-dam-7b"] if path.name == "paper.yaml" else []
    cfg = load_config(path, overrides)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.name == path.stem


def test_paper_config_requires_model_path():
    root = Path(__file__).resolve().parents[1] / "configs"
    with pytest.raises(ConfigError, match="model.path"):
        load_config(root / "paper.yaml")


def test_paper_config_holds_paper_hyperparameters():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "paper.yaml", ["model.path=/x", "evaluation.judge_path=/y"])
    assert (cfg.lora.r, cfg.lora.alpha) == (128, 256)
    assert len(cfg.lora.target_modules) == 7
    assert cfg.reference.beta == 0.9
    assert (cfg.scoring.sparsity, cfg.realign.layer_rate, cfg.realign.epsilon) == (0.8, 0.5, 0.2)
    assert cfg.finetune.epochs == 10 and cfg.finetune.learning_rate == 2e-6
    assert cfg.alignment.preference.beta == 0.1
    assert cfg.evaluation.harmful_limit == 1000


def test_dotted_overrides_are_typed():
    cfg = load_config(None, ["realign.epsilon=0.1", "data.poison_ratio=0.2", "lora.target_modules=[q_proj, v_proj]"])
    assert cfg.realign.epsilon == 0.1
    assert cfg.data.poison_ratio == 0.2
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("override, message", [
    ("realign.epsilonn=0.1", "unknown field 'epsilonn' in realign"),
    ("nope.x=1", "unknown field 'nope'"),
    ("data.poison_ratio=1.5", "data.poison_ratio"),
    ("data.task=mnli", "data.task"),
    ("realign.epsilon", "expected KEY=VALUE"),
    ("alignment.method=ppo", "alignment.method"),
    ("realign.layer_rate=0.9", "layer_rate ± realign.epsilon"),
])
def test_bad_overrides_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message.replace("±", ".")):
        load_config(None, [override])


def test_unknown_yaml_key_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nfinetune:\n  learning_rte: 0.1\n")
    with pytest.raises(ConfigError, match=r"finetune.learning_rte.*(extra|not permitted)"):
        load_config(bad)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_local_model_needs_path():
    with pytest.raises(ConfigError, match="model.path is required"):
        load_config(None, ["model.source=local"])


def test_stage_hashes_are_stable_and_sensitive():
    a, b = load_config(None), load_config(None)
    assert config_hash(a) == config_hash(b)
    assert stable_hash(a.scoring) == stable_hash(b.scoring)
    c = load_config(None, ["scoring.sparsity=0.7"])
    assert stable_hash(c.scoring) != stable_hash(a.scoring)
    assert stable_hash(c.realign) == stable_hash(a.realign)  # other stages keep their key
    # key order in the input does not matter
    assert stable_hash({"a": 1, "b": 2}) == stable_hash({"b": 2, "a": 1})


def test_paper_defenses_grid_runs_every_registered_defense_at_paper_scale():
    """configs/grids/paper-defenses.yaml (config only, no model): every registered defense of every family, on the
    paper's cell, with the release's / original papers' knobs (docs/defenses-spec.md)."""
    from nlsr.config import load_grid
    from nlsr.methods import ALIGNMENT_DEFENSES, FINETUNE_DEFENSES, REALIGNERS
    path = Path(__file__).resolve().parents[1] / "configs" / "grids" / "paper-defenses.yaml"
    cells = load_grid(path).cells(path.parent, ["model.path=/m/llama3-8b", "evaluation.judge_path=/m/beaver-dam-7b"])
    assert [c.data.seed for c in cells] == [0, 1, 2]
    for cfg in cells:
        assert cfg.model.source == "local" and (cfg.lora.r, cfg.lora.alpha) == (128, 256)
        assert (cfg.data.n, cfg.data.poison_ratio, cfg.alignment.method) == (1000, 0.05, "dpo")
        assert set(cfg.alignment.defenses) == set(ALIGNMENT_DEFENSES.names())
        assert set(cfg.finetune.defenses) == set(FINETUNE_DEFENSES.names())
        assert set(cfg.realign.methods()) == set(REALIGNERS.names())
        assert cfg.finetune.grad_accum == 1 and cfg.finetune.batch_size == 8  # Lisa's phases count micro-batches
        d = cfg.defenses
        assert d.vaccine.rho == 2.0 and d.vaccine.perturb_reference and d.vlguard.guard_fraction == 0.1
        assert (d.lisa.rho, d.lisa.align_steps, d.lisa.finetune_steps, d.lisa.guide_fraction) == (1.0, 50, 200, 0.1)
        assert (d.constrained_sft.beta, d.constrained_sft.first_token_bias_factor, d.constrained_sft.bias_factor,
                d.constrained_sft.bias_length) == (0.1, 5.0, 20.0, 5)
        assert cfg.realign.antidote.density == 0.1 and cfg.realign.resta.gamma == 1.0
        assert cfg.realign.unaligned.source != cfg.data.poison_source
