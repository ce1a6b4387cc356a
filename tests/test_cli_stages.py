"""`nlsr align | finetune | evaluate` on the tiny model, and their user errors (exit status 2, a clear message)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.cli import build_parser, main
from nlsr import data, modeling

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")


def sets(root: Path) -> list[str]:
    out = []
    for s in (f"artifact_root={root}", "alignment.sft.max_length=256", "alignment.preference.max_length=256",
              "finetune.max_length=256", "evaluation.judge=keyword"):
        out += ["--set", s]
    return out


@pytest.fixture(scope="module")
def aligned_dir(shared_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "align"
    assert main(["align", SMOKE, *sets(shared_root), "--base", "tiny", "--out", str(out)]) == 0
    return out


def test_help_lists_the_stage_commands(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    assert all(cmd in text for cmd in ("align", "finetune", "evaluate"))


def test_align_writes_w0_and_the_aligned_adapter(aligned_dir, capsys):
    assert (aligned_dir / "w0" / "config.json").is_file()
    assert (aligned_dir / "w0" / "sft_adapter" / "adapter_config.json").is_file()
    assert (aligned_dir / "aligned" / "adapter_model.safetensors").is_file()


def test_align_under_an_alignment_stage_defense(aligned_dir, shared_root, tmp_path, capsys):
    """`nlsr align --defense vaccine`: the same W0, the aligned adapter trained by Vaccine-DPO instead."""
    out = tmp_path / "vac"
    capsys.readouterr()
    assert main(["align", SMOKE, *sets(shared_root), "--set", "defenses.vaccine.rho=0.5", "--base", "tiny",
                 "--defense", "vaccine", "--out", str(out)]) == 0
    assert '"defense": "vaccine"' in capsys.readouterr().out  # the summary (after the trainer's log lines)
    info = json.loads((out / "aligned" / modeling.ADAPTER_INFO).read_text())
    assert info["defense"] == "vaccine" and info["rho"] == 0.5
    plain, vac = modeling.adapter_weights(aligned_dir / "aligned"), modeling.adapter_weights(out / "aligned")
    assert plain.keys() == vac.keys() and any(not (plain[k] == vac[k]).all() for k in plain)


def test_finetune_then_evaluate(aligned_dir, shared_root, tmp_path, capsys):
    mix = data.write_jsonl(data.poison_mix("sst2", 16, 0.25), tmp_path / "mix.jsonl")
    w0, ft = aligned_dir / "w0", tmp_path / "ft"
    assert main(["finetune", SMOKE, *sets(shared_root), "--base", str(w0), "--adapter",
                 str(aligned_dir / "aligned"), "--mix", str(mix), "--out", str(ft)]) == 0
    assert modeling.adapter_weights(ft).keys() == modeling.adapter_weights(aligned_dir / "aligned").keys()
    capsys.readouterr()
    out = tmp_path / "eval.json"
    assert main(["evaluate", SMOKE, *sets(shared_root), "--base", str(w0), "--adapter", str(ft), "--task", "agnews",
                 "--limit", "3", "--judge", "keyword", "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["task"] == "agnews" and metrics["n_harmful"] == 3 and metrics["n_task"] == 3
    assert {"harmful_score", "task_accuracy", "task_accuracy_strict", "samples"} <= metrics.keys()
    assert Path(metrics["samples"]).is_file() and json.loads(capsys.readouterr().out)["n_task"] == 3


def test_finetune_none_adapter_is_a_fresh_lora(shared_root, tmp_path):
    mix = data.write_jsonl(data.poison_mix("sst2", 8, 0.25), tmp_path / "mix.jsonl")
    assert main(["finetune", SMOKE, *sets(shared_root), "--set", "finetune.max_steps=1", "--base", "tiny",
                 "--adapter", "none", "--mix", str(mix), "--out", str(tmp_path / "ft")]) == 0
    assert (tmp_path / "ft" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("argv, message", [
    (["evaluate", SMOKE, "--base", "tiny", "--task", "mnli", "--out", "x.json"], "data.task"),
    (["evaluate", SMOKE, "--base", "tiny", "--judge", "oracle", "--out", "x.json"], "evaluation.judge"),
    (["align", SMOKE, "--set", "alignment.method=ppo", "--out", "x"], "alignment.method"),
    (["align", SMOKE, "--set", "alignment.metod=dpo", "--out", "x"], "unknown field 'metod'"),
    (["align", SMOKE, "--defense", "vaccine", "--set", "alignment.method=kto", "--out", "x"],
     "'vaccine' needs alignment.method in ['dpo']"),
    (["align", "no/such/config.yaml", "--out", "x"], "does not exist"),
    (["evaluate", SMOKE, "--base", "no/such/model", "--out", "x.json"], "not a Hugging Face model folder"),
])
def test_config_and_path_errors_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_adapter_and_empty_mix_exit_2(shared_root, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    assert main(["finetune", SMOKE, *sets(shared_root), "--base", "tiny", "--adapter", str(tmp_path),
                 "--mix", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "ft")]) == 2
    assert "not a LoRA adapter" in capsys.readouterr().err
    assert main(["finetune", SMOKE, *sets(shared_root), "--base", "tiny", "--adapter", "none",
                 "--mix", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "ft")]) == 2
    assert "holds no rows" in capsys.readouterr().err
    assert not (tmp_path / "ft").exists()
