"""Cache-key coverage: the guard against silently reusing a stale result.

Every leaf field of the experiment config is changed one at a time (on the smoke config, and on variants where a
field is read only in some setting); the stages whose artifact keys change must be exactly the ones that read
the field, plus everything downstream of them. A field no stage reads (device, artifact root, tracking) must
change no key, except the report's: the report's key carries the experiment hash, which identifies the run in
MLflow and the results table, and is cheap to recompute.

The only interface used is the public `tasks.keys.plan(cfg)`: {label: node with .key and .inputs}.
"""
from __future__ import annotations

import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from nlsr.config import ConfigError, ExperimentConfig, load_config
from tasks.keys import plan

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"

TRAINED = {"sft", "align", "score", "finetune", "evaluate"}  # stages that load the model: dtype, template
NLSR_REALIGN = {"realign:nlsr", "realign:restore-modules"}    # the selection-based realigners

# field (dotted; a section name covers its fields) -> labels (or stage names) that read it directly. The
# test adds everything downstream. `None`: read by no stage (the allow-list).
READERS: dict[str, set[str] | None] = {
    "name": set(),
    "seed": {"sft", "align", "finetune", "evaluate"},
    "artifact_root": None,
    "tracking": None,
    "model.device": None,
    "model.dtype": TRAINED,
    "model.source": {"sft"},          # the raw base is the input of sft (and of everything on it)
    "model.tiny": {"sft"},
    "model.path": set(),              # read only when source is 'local' (see VARIANTS)
    "lora": {"sft", "align", "finetune"},
    "data.task": {"poison", "evaluate"},
    "data.n": {"poison"}, "data.poison_ratio": {"poison"}, "data.poison_source": {"poison"},
    "data.seed": {"poison"},
    "data.template": TRAINED,
    "alignment.sft": {"sft"},
    "alignment.harmless_mix": {"sft"},
    "alignment.safety_answers": {"sft", "align"},
    "alignment.method": {"align"},
    "alignment.preference": {"align"},
    "alignment.defenses": set(),      # adds its own steps, changes no existing key (see below)
    "finetune": {"finetune"},
    "reference": {"reference"},
    "scoring": {"score"},
    # generated calibration only (see VARIANTS): with the shipped answers these are not read
    "scoring.calibration_pool": set(), "scoring.calibration_max_new_tokens": set(),
    # which method's output is "realigned": each realign key depends on the method it runs, not on this choice,
    # but the variant "realigned" now evaluates another adapter
    "realign.method": {"evaluate:realigned"},
    "realign.baselines": set(),       # changes which baselines exist, not the keys of the others (see below)
    "finetune.defenses": set(),       # the same for the fine-tuning-stage defenses
    "realign.stack_on": set(),        # adds its own steps (NLSR on a defense's adapter), changes no existing key
    "realign.layer_rate": NLSR_REALIGN, "realign.epsilon": NLSR_REALIGN, "realign.seed": NLSR_REALIGN,
    "realign.direction": NLSR_REALIGN,
    "realign.safelora_tau": {"realign:safelora"},
    # Antidote's and RESTA's settings: read only when they are evaluated (see VARIANTS)
    "realign.antidote": set(), "realign.resta": set(), "realign.unaligned": set(),
    "evaluation": {"evaluate"},
    # the training-stage defenses' knobs (nlsr/defenses): read only by their own finetune:<d> / align:<d> step,
    # when finetune.defenses / alignment.defenses lists it (see VARIANTS)
    "defenses": set(),
}

# (overrides that make a field read, field -> readers in that setting)
VARIANTS = [
    (["scoring.calibration=reference", "evaluation.judge=classifier"],
     {"scoring.calibration_pool": {"score"}, "scoring.calibration_max_new_tokens": {"score"},
      "evaluation.judge": {"score", "evaluate"}, "evaluation.batch_size": {"score", "evaluate"},
      "evaluation.judge_path": {"score", "evaluate"}}),
    (["model.source=local", f"model.path={ROOT / 'tests'}"], {"model.path": {"sft"}, "model.tiny": set()}),
    (["alignment.harmless_mix=0.25"], {"data.task": {"poison", "sft", "evaluate"}}),
    (['realign.baselines=["safelora","antidote","resta"]'],
     {"realign.antidote": {"realign:antidote"}, "realign.resta": {"realign:resta"},
      "realign.unaligned": {"unalign"}}),
    (['finetune.defenses=["vlguard","lisa","constrained-sft"]'],
     {"defenses.vlguard": {"finetune:vlguard"}, "defenses.lisa": {"finetune:lisa"},
      "defenses.constrained_sft": {"finetune:constrained-sft"}}),
    (['alignment.defenses=["vaccine"]'], {"defenses.vaccine": {"align:vaccine"}}),
]


def leaves(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += leaves(ann, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


def get(cfg: BaseModel, path: str):
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def annotation(path: str):
    model = ExperimentConfig
    *parents, name = path.split(".")
    for part in parents:
        model = model.model_fields[part].annotation
    return model.model_fields[name].annotation


def registry_names(path: str) -> tuple[str, ...] | None:
    """The names of the method registry that validates `path` (an AfterValidator(<Registry>.check), possibly inside
    a list), or None."""
    model = ExperimentConfig
    *parents, name = path.split(".")
    for part in parents:
        model = model.model_fields[part].annotation
    field = model.model_fields[name]
    metadata = list(field.metadata)
    for arg in typing.get_args(field.annotation):
        metadata += list(getattr(arg, "__metadata__", ()))
    for m in metadata:
        check = getattr(m, "func", None)
        owner = getattr(check, "__self__", None)
        if owner is not None and hasattr(owner, "names"):
            return owner.names()
    return None


def candidates(path: str, value) -> list:
    """Values to try instead of `value`, most natural first (validation picks the first that passes)."""
    if path == "evaluation.judge":  # a registered judge: the registry, not a Literal, lists the names
        from nlsr.judges import judge_names
        return [name for name in judge_names() if name != value]
    ann = annotation(path)
    registered = registry_names(path)
    if registered is not None:  # a method family (nlsr.methods): the registry, not a Literal, lists the names
        if isinstance(value, list):
            return [value[:1], value + [x for x in registered if x not in value][:1], []]
        return [name for name in registered if name != value]
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    literals = [x for a in [ann, *args] if typing.get_origin(a) is typing.Literal for x in typing.get_args(a)]
    if literals and not isinstance(value, list):
        return [x for x in literals if x != value]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value * 2, 2, 1]
    if isinstance(value, float):
        return [round(value * 0.5, 6), round(value + 0.1, 6), 0.3, 0.5]
    if isinstance(value, list):
        return [value[:1], value + [x for x in literals if x not in value][:1], []]
    if value is None:
        return [str(ROOT / "tests"), 100, 3, 0.5, "x"]
    return ["cpu" if value != "cpu" else "cuda", f"{value}-changed", "/tmp/elsewhere"]


def changed_cfg(base_overrides: list[str], path: str, base: ExperimentConfig, strict: bool = True
                ) -> ExperimentConfig | None:
    """`base` with `path` changed; None (strict False) when no candidate is valid in this setting."""
    import json
    value = get(base, path)
    for cand in candidates(path, value):
        if cand == value:
            continue
        try:
            return load_config(SMOKE, [*base_overrides, f"{path}={json.dumps(cand)}"])
        except ConfigError:
            continue
    if not strict:
        return None
    raise AssertionError(f"no valid change found for {path} (value {value!r}): extend candidates()")


def readers(path: str, extra: dict) -> set[str] | None:
    for table in (extra, READERS):
        for key in sorted(table, key=len, reverse=True):  # the most specific entry wins
            if path == key or path.startswith(key + "."):
                return table[key]
    raise AssertionError(f"config field {path} is not in READERS: say which stages read it")


def expected_changes(nodes: dict, direct: set[str]) -> set[str]:
    """Labels that read a changed field directly, and everything downstream of them (through input keys)."""
    changed = {label for label, n in nodes.items() if label in direct or n.stage in direct}
    grew = True
    while grew:
        keys = {nodes[label].key for label in changed}
        more = {label for label, n in nodes.items() if label not in changed
                and any(k in keys for k in (n.inputs or {}).values())}
        changed |= more
        grew = bool(more)
    return changed


CASES = [([], {})] + VARIANTS
# with RESTA evaluated, data.poison_source and realign.unaligned.source must differ and each has two values: neither
# can change alone there; with Vaccine, alignment.method must stay 'dpo' (the smoke case covers all three)
NO_VALID_CHANGE = {"data.poison_source", "realign.unaligned.source", "alignment.method"}
# valid only beside a matching finetune.defenses entry: its own test below changes both together
OWN_TEST = {"realign.stack_on"}


@pytest.mark.parametrize("base_overrides, extra", CASES, ids=["smoke", "calibration", "local", "harmless", "antidote-resta", "defenses", "vaccine"])
def test_every_field_changes_exactly_the_keys_of_its_readers(base_overrides, extra):
    base = load_config(SMOKE, base_overrides)
    before = plan(base)
    fields = leaves(ExperimentConfig)
    assert len(fields) > 60
    problems = []
    for path in fields:
        strict = not (base_overrides and path in NO_VALID_CHANGE) and path not in OWN_TEST
        changed = changed_cfg(base_overrides, path, base, strict=strict)
        if changed is None:
            continue
        after = plan(changed)
        if set(after) != set(before):  # the DAG's shape changed (methods, baselines, Non-Aligned)
            common = set(after) & set(before)
            changed = {label for label in common if after[label].key != before[label].key}
        else:
            common = set(before)
            changed = {label for label in before if after[label].key != before[label].key}
        direct = readers(path, extra)
        if direct is None:  # the allow-list: not even a report (the experiment hash leaves these out too)
            want = {"report"} if path == "model.device" else set()
        else:
            want = (expected_changes(before, direct) | {"report"}) & common
        if changed != want:
            problems.append(f"{path}: changed {sorted(changed)}, expected {sorted(want)}")
    assert not problems, "\n".join(problems)


def test_dag_shape_fields_change_only_what_they_add_or_remove():
    base = load_config(SMOKE)
    before = plan(base)
    fewer = plan(load_config(SMOKE, ["realign.baselines=[safelora]"]))
    assert set(before) - set(fewer) == {"realign:restore-modules", "evaluate:restore-modules"}
    assert all(fewer[k].key == before[k].key for k in fewer if k != "report")
    non_aligned = plan(load_config(SMOKE, ["finetune.aligned=false"]))
    assert not any(k.startswith("realign") for k in non_aligned)
    assert non_aligned["finetune"].key != before["finetune"].key


def test_an_alignment_stage_defense_adds_its_own_steps_and_changes_no_existing_key():
    """alignment.defenses=[vaccine] adds align:vaccine (from W0, like align), finetune:vaccine (the undefended
    fine-tuning's config slice, continuing align:vaccine) and evaluate:vaccine; every existing step keeps its key
    (the report lists one more row). Vaccine's knobs go into its own keys only."""
    from nlsr.config import stable_hash
    from nlsr.dag import LATE_FIELDS
    from tasks.keys import experiment_hash, key_for
    cfg = load_config(SMOKE, ["alignment.defenses=[vaccine]"])
    before, vac = plan(load_config(SMOKE)), plan(cfg)
    assert set(vac) - set(before) == {"align:vaccine", "finetune:vaccine", "evaluate:vaccine"}
    assert {k for k in before if before[k].key != vac[k].key} == {"report"}
    assert vac["align:vaccine"].inputs == vac["align"].inputs and vac["align:vaccine"].key != vac["align"].key
    assert vac["finetune:vaccine"].inputs == {**vac["finetune"].inputs, "adapter": vac["align:vaccine"].key}
    assert vac["finetune:vaccine"].key == key_for("finetune", cfg, vac["finetune:vaccine"].inputs)
    assert vac["evaluate:vaccine"].inputs["adapter"] == vac["finetune:vaccine"].key
    rho = plan(load_config(SMOKE, ["alignment.defenses=[vaccine]", "defenses.vaccine.rho=0.5"]))
    assert {k for k in vac if vac[k].key != rho[k].key} == {"align:vaccine", "finetune:vaccine", "evaluate:vaccine",
                                                           "report"}
    # the field joined the config later: at its default it stays out of the experiment hash (MLflow run identity)
    plain = load_config(SMOKE)
    dump = plain.model_dump(mode="json", exclude={"artifact_root", "tracking"})
    for *sections, name in LATE_FIELDS:  # alignment.defenses and every other field that joined later
        part = dump
        for section in sections:
            part = part[section]
        del part[name]
    assert experiment_hash(plain) == stable_hash(dump) != experiment_hash(cfg)


def test_stacking_the_realigner_on_a_defense_adds_its_own_steps_and_changes_no_existing_key():
    """realign.stack_on=[lisa] adds realign:nlsr-on-lisa (NLSR's inputs, with Lisa's fine-tuned adapter in place of
    the undefended one) and its evaluation; every existing step keeps its key. Stacking needs the defense in the
    cell, on the aligned model's base."""
    from nlsr.config import ConfigError
    lisa = ["finetune.defenses=[lisa, non-aligned]"]
    before, stacked = plan(load_config(SMOKE, lisa)), plan(load_config(SMOKE, [*lisa, "realign.stack_on=[lisa]"]))
    assert set(stacked) - set(before) == {"realign:nlsr-on-lisa", "evaluate:nlsr-on-lisa"}
    assert {k for k in before if before[k].key != stacked[k].key} == {"report"}
    node = stacked["realign:nlsr-on-lisa"]
    assert node.inputs == {**stacked["realign:nlsr"].inputs, "finetuned": stacked["finetune:lisa"].key}
    assert stacked["evaluate:nlsr-on-lisa"].inputs["adapter"] == node.key
    with pytest.raises(ConfigError, match="realign.stack_on: 'vlguard' is not in finetune.defenses"):
        load_config(SMOKE, [*lisa, "realign.stack_on=[vlguard]"])
    with pytest.raises(ConfigError, match="'non-aligned' fine-tunes the raw base"):
        load_config(SMOKE, [*lisa, "realign.stack_on=[non-aligned]"])
