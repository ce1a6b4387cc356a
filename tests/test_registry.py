"""Method registries (nlsr.methods) and the DAG description (nlsr.dag): names are written once; config choices,
CLI choices, the flow, the keys and the stage code read them; an unknown name fails with the valid ones."""
import argparse

import pytest

from nlsr import dag
from nlsr.config import ConfigError, ScoringConfig, load_config
from nlsr.methods import ALIGNMENT, ALIGNMENT_DEFENSES, FAMILIES, FINETUNE_DEFENSES, REALIGNERS, SCORERS
from nlsr.registry import Registry, UnknownMethod


@pytest.mark.parametrize("override,family", [("alignment.method=nope", ALIGNMENT),
                                             ("scoring.method=nope", SCORERS),
                                             ("realign.method=nope", REALIGNERS),
                                             ("realign.baselines=[safelora, nope]", REALIGNERS),
                                             ("finetune.defenses=[nope]", FINETUNE_DEFENSES),
                                             ("alignment.defenses=[nope]", ALIGNMENT_DEFENSES)])
def test_unknown_names_fail_with_the_valid_ones(override, family):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert "'nope'" in str(err.value) and all(name in str(err.value) for name in family.names())


def test_unknown_scorer_no_longer_runs_as_random():
    from nlsr.scoring import compute_scores
    bad = ScoringConfig.model_construct(**{**ScoringConfig().model_dump(), "method": "nope"})
    with pytest.raises(UnknownMethod, match="expected one of \\['lowrank', 'wanda', 'snip', 'random'\\]"):
        compute_scores(None, [], bad, "cpu")


def test_builtin_entries_resolve():
    """Every lazy 'module:function' target of the built-in methods imports (a typo would fail only at run time)."""
    for family in FAMILIES.values():
        for name in family.names():
            entry = family.entry(name)
            assert entry.target is None or callable(entry.load()), (family.family, name)


def test_registry_decorator_and_duplicates():
    reg = Registry("thing", "section.thing")

    @reg.register("a", colour="red")
    def a():
        return 1

    assert reg.get("a") is a and reg.meta("a") == {"colour": "red"} and reg.names() == ("a",)
    with pytest.raises(ValueError, match="already registered"):
        reg.add("a", a)
    with pytest.raises(UnknownMethod, match=r"unknown thing 'b' \(section.thing\); expected one of \['a'\]"):
        reg.get("b")
    reg.unregister("a")
    assert "a" not in reg


def test_cli_choices_come_from_the_registries():
    from flows.cli_method import add_commands
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    sub = {a.dest: a for a in parser._subparsers._group_actions[0].choices["realign"]._actions}
    assert tuple(sub["method"].choices) == REALIGNERS.names()
    score = {a.dest: a for a in parser._subparsers._group_actions[0].choices["score"]._actions}
    assert tuple(score["method"].choices) == SCORERS.names()


def test_a_registered_realigner_joins_the_dag_and_the_keys():
    """One registry entry is enough for config validation, the DAG, and the cache keys."""
    from tasks.keys import plan
    REALIGNERS.add("probe", "nowhere:nothing", inputs={"base": "wbase", "finetuned": "finetune"}, settings=())
    try:
        cfg = load_config(None, ["realign.baselines=[safelora, probe]"])
        nodes = plan(cfg)
        assert nodes["realign:probe"].inputs == {"base": nodes["sft"].key, "finetuned": nodes["finetune"].key}
        assert "evaluate:probe" in nodes and "probe" in nodes["report"].inputs
        assert dag.variants(cfg)["probe"] == {"defense": "probe", "defense_stage": "post-fine-tuning"}
        # its key ignores the other methods' settings
        other = load_config(None, ["realign.baselines=[safelora, probe]", "realign.safelora_tau=0.9"])
        assert plan(other)["realign:probe"].key == nodes["realign:probe"].key
    finally:
        REALIGNERS.unregister("probe")
    with pytest.raises(ConfigError):
        load_config(None, ["realign.baselines=[probe]"])


def test_dag_steps_are_ordered_and_complete():
    cfg = load_config(None, ["realign.baselines=[safelora, antidote, resta]", "finetune.defenses=[non-aligned]"])
    steps = dag.steps(cfg)
    seen = {"base"}
    for s in steps:
        assert all(src in seen for src in s.inputs.values() if src), s.label
        seen.add(s.label)
    labels = [s.label for s in steps]
    assert labels[-1] == "report" and "unalign" in labels and "finetune:non-aligned" in labels
    assert "unalign" not in [s.label for s in dag.steps(load_config(None, ["realign.baselines=[antidote]"]))]
    for s in steps[:-1]:  # every stage of the description has a config slice
        assert isinstance(dag.stage_config(s.stage, cfg, s.method), dict)


def test_defense_knobs_only_change_their_own_keys():
    from tasks.keys import plan
    base = plan(load_config(None, ["realign.baselines=[safelora, antidote, resta]"]))
    for override, changed in (("realign.antidote.density=0.05", {"realign:antidote", "evaluate:antidote"}),
                              ("realign.resta.gamma=0.5", {"realign:resta", "evaluate:resta"}),
                              ("realign.unaligned.learning_rate=1e-4",
                               {"unalign", "realign:resta", "evaluate:resta"})):
        new = plan(load_config(None, ["realign.baselines=[safelora, antidote, resta]", override]))
        diff = {k for k in base if base[k].key != new[k].key} - {"report"}
        assert diff == changed, override


def test_an_alignment_stage_defense_names_the_methods_it_can_change():
    with pytest.raises(ConfigError, match=r"'vaccine' needs alignment.method in \['dpo'\], got 'kto'"):
        load_config(None, ["alignment.defenses=[vaccine]", "alignment.method=kto"])
    assert load_config(None, ["alignment.defenses=[vaccine]"]).alignment.defenses == ["vaccine"]


def test_one_name_in_two_defense_families_fails_instead_of_sharing_a_step():
    FINETUNE_DEFENSES.add("vaccine", None)  # a fine-tuning-stage defense named like the alignment-stage one
    try:
        cfg = load_config(None, ["finetune.defenses=[vaccine]", "alignment.defenses=[vaccine]"])
        with pytest.raises(ConfigError, match=r"two steps named \['evaluate:vaccine', 'finetune:vaccine'\]"):
            dag.steps(cfg)
    finally:
        FINETUNE_DEFENSES.unregister("vaccine")
