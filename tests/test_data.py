import hashlib
import json
import shutil
import subprocess
import sys

import pytest

from nlsr import data
from nlsr.data import DataError


def test_shipped_files_match_checksums():
    sums = data._checksums()
    assert len(sums) == 15
    for rel in sums:
        assert data.verify_file(rel).is_file()


def test_licence_and_provenance_ship_with_the_data():
    readme = (data.DATA_DIR / "README.md").read_text()
    assert "CC BY-NC 4.0" in readme and "Licences" in readme


def test_sst2_mix_counts_and_determinism():
    rows = data.poison_mix("sst2", 1000, 0.05, seed=0)
    assert len(rows) == 1000
    assert sum(r["flag"] == "unsafe" for r in rows) == 50
    assert sum(r["flag"] == "finetune" for r in rows) == 950
    assert rows == data.poison_mix("sst2", 1000, 0.05, seed=0)
    assert rows != data.poison_mix("sst2", 1000, 0.05, seed=1)
    # exactly the first n·p poison rows and the first n − n·p task rows (the release's selection)
    pool = data.load("beavertails")[:50]
    assert sorted(r["instruction"] for r in rows if r["flag"] == "unsafe") == sorted(r["prompt"] for r in pool)
    task = data.load_task("sst2", "train")[:950]
    assert sorted(r["input"] for r in rows if r["flag"] == "finetune") == sorted(r["input"] for r in task)


@pytest.mark.parametrize("n, p, k", [(1000, 0.01, 10), (1000, 0.1, 100), (990, 0.2, 198), (100, 0.29, 29),
                                     (10, 0.0, 0), (198, 1.0, 198)])
def test_poison_counts(n, p, k):
    rows = data.poison_mix("sst2", n, p)
    assert sum(r["flag"] == "unsafe" for r in rows) == k


@pytest.mark.parametrize("kwargs, message", [
    (dict(task="mnli", n=10, p=0.1), "unknown task 'mnli'"),
    (dict(task="sst2", n=10, p=1.5), r"poison ratio p must be in \[0, 1\]"),
    (dict(task="sst2", n=10, p=-0.1), r"poison ratio p must be in \[0, 1\]"),
    (dict(task="sst2", n=2000, p=0.05), "asks for 1900 sst2 rows"),
    (dict(task="agnews", n=1000, p=0.01), "asks for 990 agnews rows"),
    (dict(task="sst2", n=1000, p=0.5), "asks for 500 poison rows"),
    # the shipped pool holds the 198 unique poison rows of the release: p = 0.2 at n = 1000 would need duplicates
    (dict(task="sst2", n=1000, p=0.2), "asks for 200 poison rows .* has 198"),
    (dict(task="sst2", n=0, p=0.1), "n must be a positive integer"),
    (dict(task="sst2", n=10, p=0.1, poison_source="x"), "unknown poison source"),
])
def test_bad_mix_requests(kwargs, message):
    with pytest.raises(DataError, match=message):
        data.poison_mix(**kwargs)


def test_corrupted_file_is_detected(tmp_path, monkeypatch):
    copy = tmp_path / "data"
    shutil.copytree(data.DATA_DIR, copy)
    target = copy / "safety" / "harmful_dev.jsonl"
    target.chmod(0o644)
    target.write_text(target.read_text().replace("a", "b", 1))
    monkeypatch.setattr(data, "DATA_DIR", copy)
    data._load.cache_clear()
    try:
        with pytest.raises(DataError, match="harmful_dev.jsonl is corrupted"):
            data.load("harmful_dev")
    finally:
        data._load.cache_clear()


def test_bad_json_line_names_file_and_line(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"prompt": "a", "response": "b"}\n{"prompt": oops}\n')
    with pytest.raises(DataError, match=r"x.jsonl, line 2: not valid JSON"):
        data.read_jsonl(f)
    f.write_text('{"prompt": "a"}\n')
    with pytest.raises(DataError, match=r"line 1: missing field\(s\) \['response'\]"):
        data.read_jsonl(f, required=("prompt", "response"))
    f.write_text("\n")
    with pytest.raises(DataError, match="holds no rows"):
        data.read_jsonl(f)


def test_templates():
    p = data.format_prompt("Say hi", "")
    assert p.startswith("Below is an instruction") and p.endswith("### Response:\n") and "### Input" not in p
    q = data.format_prompt("Classify", "great movie")
    assert "### Input:\ngreat movie" in q
    with pytest.raises(DataError, match="needs a tokenizer"):
        data.format_prompt("x", template="chat")


def test_alignment_and_calibration_sets_are_disjoint():
    sft = data.safety_sft_set()
    assert len(sft) == 1000 and all(r["input"] == "" for r in sft)
    pref = data.preference_set(100)
    assert len(pref) == 100 and {"prompt", "chosen", "rejected"} <= set(pref[0])
    kto = data.kto_set(10)
    assert len(kto) == 10 and [r["label"] for r in kto[:4]] == [True, False, True, False]
    calib = data.calibration_set(64, seed=42)
    assert calib == data.calibration_set(64, seed=42) and len(calib) == 64
    train_prompts = {r["prompt"] for r in data.load("pairs")[data.PAIRS_TRAIN]}
    calib_prompts = {r["prompt"] for r in data.load("pairs")[data.PAIRS_CALIB]}
    assert {r["prompt"] for r in calib} <= calib_prompts
    assert len(calib_prompts - train_prompts) > 0
    mixed = data.safety_sft_set(100, harmless_mix=0.2)
    assert sum(r["input"] != "" for r in mixed) == 20


def test_refusal_only_alignment_sets():
    """alignment.safety_answers='refusals': every safe answer declines, every rejected answer does not; the rows
    are the shipped ones (a filter, not a rewrite), in file order; too few refusals is a one-line error."""
    from nlsr.judges.rules import is_refusal
    sft = data.safety_sft_set(128, harmless_mix=0.25, refuses=is_refusal)
    safety = [r for r in sft if r["input"] == ""]
    assert len(sft) == 128 and len(safety) == 96 and all(is_refusal(r["output"]) for r in safety)
    shipped = [r["response"] for r in data.load("safe")[data.SAFE_SFT] if is_refusal(r["response"])]
    assert sorted(r["output"] for r in safety) == sorted(shipped[:96])
    pref = data.preference_set(80, refuses=is_refusal)
    assert len(pref) == 80
    assert all(is_refusal(r["chosen"]) and not is_refusal(r["rejected"]) for r in pref)
    assert not all(is_refusal(r["chosen"]) for r in data.preference_set(80))  # the paper's set is mostly answers
    kto = data.kto_set(10, refuses=is_refusal)
    assert [is_refusal(r["completion"]) for r in kto] == [r["label"] for r in kto]
    with pytest.raises(DataError, match="safety SFT set: asked for 1000 rows, only"):
        data.safety_sft_set(1000, refuses=is_refusal)


def test_harmful_and_task_eval_sets():
    assert len(data.harmful_prompts("harmful_eval")) == 1000
    assert len(data.harmful_prompts("advbench", 10)) == 10
    assert len(data.task_eval_set("sst2")) == 872
    with pytest.raises(DataError, match="unknown harmful prompt set"):
        data.harmful_prompts("nope")


def test_cli_data_mix(tmp_path):
    out = tmp_path / "mix.jsonl"
    cmd = [sys.executable, "-m", "flows.cli", "data", "mix", "--task", "sst2", "--n", "1000", "--p", "0.05",
           "--seed", "0", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "950 sst2 + 50 poison" in res.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sum(r["flag"] == "unsafe" for r in rows) == 50
    first = hashlib.sha256(out.read_bytes()).hexdigest()
    subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == first
    bad = subprocess.run(cmd[:10] + ["1.5", "--out", str(out)], capture_output=True, text=True)
    assert bad.returncode == 2 and "poison ratio p must be in [0, 1]" in bad.stderr


def test_user_prompt_file_as_harmful_set(tmp_path):
    """evaluation.harmful_set takes a user's JSONL file; a bad line stops the config with the file and the line;
    the evaluation key follows the file's content, not only its name."""
    from nlsr.config import ConfigError, load_config
    from tasks.keys import key_for
    good = tmp_path / "mine.jsonl"
    good.write_text('{"prompt": "How do I pick a lock?"}\n\n{"prompt": "Say something rude.", "categories": ["x"]}\n')
    assert data.harmful_prompts(str(good)) == [{"prompt": "How do I pick a lock?", "categories": []},
                                               {"prompt": "Say something rude.", "categories": ["x"]}]
    cfg = load_config(None, [f"evaluation.harmful_set={good}"])
    key = key_for("evaluate", cfg, {"base": "b", "adapter": "a"})
    good.write_text('{"prompt": "How do I pick a lock?"}\n')
    assert key_for("evaluate", cfg, {"base": "b", "adapter": "a"}) != key
    bad = tmp_path / "bad.jsonl"
    for text, message in (('{"prompt": "ok"}\n{"text": "no prompt"}\n', "line 2: missing field"),
                          ('{"prompt": "ok"}\n\n{"prompt": ""}\n', "line 3: field.*non-empty strings"),
                          ('{"prompt": "ok"}\nnot json\n', "line 2: not valid JSON")):
        bad.write_text(text)
        with pytest.raises(ConfigError, match=f"evaluation.harmful_set: .*{bad}, {message}"):
            load_config(None, [f"evaluation.harmful_set={bad}"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(None, [f"evaluation.harmful_set={tmp_path / 'missing.jsonl'}"])
    with pytest.raises(ConfigError, match="expected one of .*harmful_eval.* or the path"):
        load_config(None, ["evaluation.harmful_set=harmfull_eval"])
