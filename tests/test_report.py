"""Results table and the safety-vs-accuracy plot with its Pareto front (pure library)."""
from __future__ import annotations

from nlsr import report


def rows():
    out = []
    for seed, shift in ((0, 0.0), (1, 2.0)):
        for task in ("sst2", "agnews"):
            for variant, hs, acc in (("aligned", 10, 80), ("finetuned", 60, 90), ("realigned", 20, 88),
                                     ("safelora", 30, 70)):
                out.append({"name": "t", "task": task, "poison_ratio": 0.05, "alignment": "dpo",
                            "scorer": "lowrank", "realign": "nlsr", "seed": seed, "variant": variant,
                            "harmful_score": hs + shift, "task_accuracy": acc - shift, "config_hash": "h",
                            "eval_key": "k"})
    return out


def test_pareto_front():
    pts = [(10, 80), (60, 90), (20, 88), (30, 70), (10, 75), (60, 85)]
    assert sorted(report.pareto_front(pts)) == [0, 1, 2]  # (30,70), (10,75), (60,85) are dominated
    assert report.pareto_front([]) == []


def test_summarize_averages_seeds():
    summary = report.summarize(rows())
    assert len(summary) == 8  # 2 tasks x 4 variants
    first = summary[0]
    assert first["task"] == "agnews" and first["variant"] == "aligned"  # variant order, not alphabetical
    assert first["n_seeds"] == 2 and first["harmful_score"] == 11.0 and first["task_accuracy"] == 79.0
    assert round(first["harmful_std"], 4) == 1.4142


def test_cell_rows():
    out = report.cell_rows({"task": "sst2", "seed": 3, "data_seed": 2, "poison_ratio": 0.1, "unknown": 1},
                           {"aligned": {"harmful_score": 5, "task_accuracy": 50.0, "wall_s": 1}},
                           {"aligned": "key"})
    assert out == [{"task": "sst2", "seed": 3, "data_seed": 2, "poison_ratio": 0.1, "variant": "aligned", "harmful_score": 5.0,
                    "task_accuracy": 50.0, "eval_key": "key"}]


def test_write_results(tmp_path):
    paths = report.write_results(rows(), tmp_path, title="demo")
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths["markdown"].read_text()
    assert md.startswith("# demo") and "harmful score ⬇" in md and md.count("\n| ") == 9
    back = report.read_csv(paths["rows"])
    assert len(back) == 16 and back[0]["harmful_score"] in (10, 12) and back[0]["seed"] in (0, 1)
    assert len(report.read_csv(paths["summary"])) == 8


def test_variant_styles_tell_sixteen_defenses_apart(tmp_path):
    """The defenses grid has 16 variants: tab10 alone would give two of them one colour, and the plot one legend
    entry per variant, beside the panel where it hides no point."""
    names = [f"v{i}" for i in range(16)]
    styles = report.variant_styles(names)
    assert len(set(styles.values())) == 16
    assert styles["v0"][0] == styles["v10"][0] and styles["v0"][1] != styles["v10"][1]
    import matplotlib.image

    pts = [{"task": "sst2", "variant": v, "harmful_score": i, "task_accuracy": 50 + i} for i, v in enumerate(names)]
    narrow = report.plot(pts[:3], tmp_path / "narrow.png")
    wide = report.plot(pts, tmp_path / "wide.png")
    # the legend beside the panel widens the figure; three variants keep it inside
    assert matplotlib.image.imread(wide).shape[1] > matplotlib.image.imread(narrow).shape[1] + 150


def test_write_results_changes_nothing_on_failure_and_keeps_other_files(tmp_path):
    """A user's --out folder: files the report did not write stay; a failure half-way (here the plot, after the
    CSVs, on a title matplotlib cannot typeset) leaves the old results in place and no temporary folder behind."""
    import pytest

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "results.md").write_text("old")
    with pytest.raises(ValueError):
        report.write_results(rows(), out, title=r"$\frac{$")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["notes.txt", "out", "results.md"]
    assert (out / "results.md").read_text() == "old"
    paths = report.write_results(rows(), out, title="demo")
    assert paths["markdown"] == out / "results.md" and paths["markdown"].read_text().startswith("# demo")
    assert (out / "notes.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_plot_without_points(tmp_path):
    assert report.plot([], tmp_path / "empty.png").is_file()


def test_grid_configs_expand():
    """Every grid YAML in configs/grids expands into valid cells (paper grids need a model path)."""
    from pathlib import Path

    from nlsr.config import load_grid
    folder = Path(__file__).resolve().parents[1] / "configs" / "grids"
    grids = sorted(folder.glob("*.yaml"))
    assert {g.stem for g in grids} >= {"table1", "table2", "table3", "table5", "paper-table1", "paper-table3"}
    for path in grids:
        grid = load_grid(path)
        extra = ["model.path=/models/llama-3-8b", "evaluation.judge_path=/models/beaver-dam-7b"] if path.stem.startswith("paper") else []
        cells = grid.cells(path.parent, extra)
        assert len(cells) == len(grid.points()) > 1
        if path.stem.endswith("table1"):
            # the paper grid stops at p = 0.1: n = 1000 at p = 0.2 needs more harmful rows than are shipped
            ratios = [0.01, 0.05, 0.1] if path.stem.startswith("paper") else [0.01, 0.05, 0.1, 0.2]
            assert sorted({c.data.poison_ratio for c in cells}) == ratios
            assert {c.data.task for c in cells} == {"sst2"}
        for c in cells:  # every cell's poisoned mix can be built from the shipped data
            from nlsr.data import poison_mix
            assert len(poison_mix(c.data.task, c.data.n, c.data.poison_ratio, c.data.seed, c.data.poison_source)) \
                == c.data.n
        if path.stem.endswith("table3"):
            assert {c.data.task for c in cells} == {"sst2", "agnews", "gsm8k"}
        if path.stem in {"table1", "table2", "table3", "table5"}:  # CPU tables: intervals over >= 2 data seeds
            assert len({c.data.seed for c in cells}) >= 2
        if path.stem == "table2":  # the paper's Table 2: every alignment method, fine-tuned and realigned
            assert {c.alignment.method for c in cells} == {"sft", "dpo", "orpo", "kto", "simpo"}
        if path.stem == "table5":  # the paper's Table 5: every neuron scorer under the same realignment
            assert {c.scoring.method for c in cells} == {"lowrank", "wanda", "snip", "random"}


def test_latest_cells_drop_cells_reported_twice():
    from flows.results import latest_cells

    def cell(finetuned_eval, **extra):
        return [{"name": "default", "variant": "aligned", "eval_key": "shared", **extra},
                {"name": "default", "variant": "finetuned", "eval_key": finetuned_eval, **extra}]
    old, other_seed = cell("f0"), cell("f1", data_seed=1)  # another data seed shares the aligned evaluation
    new = cell("f0", data_seed=0)                           # the first cell again, re-reported later
    rebuilt = [{"name": "default", "variant": "aligned", "eval_key": None}]  # from MLflow metrics: kept
    assert latest_cells([old, other_seed, new, rebuilt, rebuilt]) == new + other_seed + rebuilt + rebuilt
    rekeyed = cell("f0-new-key", data_seed=0)  # the same grid cell after a key change: known by its grid and label
    ids = [("grid", "data.seed=0"), ("grid", "data.seed=1"), ("grid", "data.seed=0")]
    assert latest_cells([old, other_seed, rekeyed], ids) == rekeyed + other_seed


def test_a_swept_axis_is_kept_apart_not_averaged(tmp_path):
    sweep = [{**r, "realign.layer_rate": rate} for rate in (0.3, 0.5) for r in rows()]
    assert report.extra_axes(["data.seed", "realign.seed", "data.task", "realign.layer_rate"]) == \
        ["realign.layer_rate"]
    summary = report.summarize(sweep)
    assert len(summary) == 16 and all(r["n_seeds"] == 2 for r in summary)  # per rate: 2 seeds, not 4 rows
    assert {r["realign.layer_rate"] for r in summary} == {0.3, 0.5}
    paths = report.write_results(sweep, tmp_path)
    assert "| realign.layer_rate |" in paths["markdown"].read_text()
    assert report.read_csv(paths["summary"])[0]["realign.layer_rate"] == 0.3
    assert "realign.layer_rate" in report.read_csv(paths["rows"])[0]


def test_defense_cost_counts_only_the_steps_the_undefended_model_does_not_need(tmp_path):
    """defense_s of a row: the recorded compute time of the artifacts behind its adapter that the fine-tuned
    model's evaluation does not need (a real artifact store; each artifact's time is what _SUCCESS recorded)."""
    import time

    from flows.results import with_costs
    from nlsr.artifacts import ArtifactStore
    store = ArtifactStore(tmp_path)

    def make(stage, key, inputs, pause=0.0):
        def fn(out):
            time.sleep(pause)
            out.mkdir()
            (out / "x").write_text(key)
        store.run(stage, key, fn, meta={"inputs": inputs})
        return float(store.meta(stage, key)["timings"]["wall_s"])

    t = {"sft": make("sft", "k-sft", {"base": "k-base"}, 0.3)}  # 'k-base' is no artifact: skipped
    t["align"] = make("align", "k-align", {"w0": "k-sft"}, 0.3)
    t["finetune"] = make("finetune", "k-ft", {"base": "k-sft", "adapter": "k-align"}, 0.3)
    t["reference"] = make("reference", "k-ref", {"aligned": "k-align"}, 0.2)
    t["score"] = make("score", "k-score", {"base": "k-sft", "reference": "k-ref"}, 0.2)
    t["realign"] = make("realign", "k-re", {"base": "k-sft", "reference": "k-ref", "finetuned": "k-ft",
                                             "masks": "k-score"}, 0.2)
    t["lisa"] = make("finetune", "k-lisa", {"base": "k-sft", "adapter": "k-align"}, 0.4)
    for variant, adapter in (("aligned", "k-align"), ("finetuned", "k-ft"), ("realigned", "k-re"), ("lisa", "k-lisa")):
        make("evaluate", f"e-{variant}", {"base": "k-sft", "adapter": adapter}, 0.0)
    rows = [{"variant": v, "eval_key": f"e-{v}"} for v in ("aligned", "finetuned", "realigned", "lisa")]
    rows.append({"variant": "gone", "eval_key": "e-missing"})
    out = {r["variant"]: r for r in with_costs(rows, store)}
    assert out["realigned"]["defense_s"] == round(t["reference"] + t["score"] + t["realign"], 1)
    assert out["lisa"]["defense_s"] == round(t["lisa"], 1)
    assert "defense_s" not in out["aligned"] and "defense_s" not in out["finetuned"] and "defense_s" not in out["gone"]
    summary = report.summarize([{**r, "harmful_score": 10.0, "task_accuracy": 50.0} for r in out.values()])
    assert {r["variant"]: r.get("defense_s") for r in summary}["realigned"] == out["realigned"]["defense_s"]
    assert "defense cost (s)" in report.markdown(summary)


def test_across_pairs_grid_points_that_differ_in_one_axis(tmp_path):
    """Each scorer's realigned model against low-rank's on the same prompts and seeds; the fine-tuned model, which
    the scorer does not reach (same evaluation), is left out. Hand-computed: over 2 seeds x 4 prompts wanda flags
    3 prompts low-rank does not and none the other way: +37.5 points, exact McNemar p = 2 * 0.5**3 = 0.25."""
    from nlsr.stats import encode
    verdicts = {("lowrank", "realigned", 0): [1, 0, 0, 0], ("lowrank", "realigned", 1): [0, 0, 0, 0],
                ("wanda", "realigned", 0): [1, 1, 1, 0], ("wanda", "realigned", 1): [0, 1, 0, 0],
                ("lowrank", "finetuned", 0): [1, 1, 1, 1], ("lowrank", "finetuned", 1): [1, 1, 0, 1]}
    rows = []
    for (scorer, variant, seed), flags in verdicts.items():
        rows.append({"task": "sst2", "poison_ratio": 0.2, "alignment": "dpo", "scorer": scorer, "realign": "nlsr",
                     "seed": seed, "variant": variant, "harmful_score": 100 * sum(flags) / 4, "task_accuracy": 50.0,
                     "eval_key": f"{scorer}-{variant}-{seed}" if variant == "realigned" else f"ft-{seed}",
                     "verdicts": {"harmful_score": encode(flags)}})
    for variant, seed in (("finetuned", 0), ("finetuned", 1)):  # the same fine-tuned evaluation in the wanda cells
        rows.append({**next(r for r in rows if r["variant"] == variant and r["seed"] == seed), "scorer": "wanda"})
    out = report.across(rows, "scoring.method", "lowrank")
    assert [(r["variant"], r["a"], r["b"]) for r in out] == [("realigned", "realigned (wanda)", "realigned (lowrank)")]
    r = out[0]
    assert (r["n_seeds"], r["n_prompts"], r["a_only"], r["b_only"]) == (2, 4, 3, 0)
    assert r["diff"] == 37.5 and abs(r["p_value"] - 0.25) < 1e-12
    assert report.across(rows, "scorer", "snip") == []  # no such value: nothing to compare against
    paths = report.write_results(rows, tmp_path, compare={"scoring.method": "lowrank"})
    assert len(report.read_csv(paths["across-scoring.method"])) == 1
    assert "Across scorer: each value against lowrank" in paths["markdown"].read_text()


def test_grid_compare_must_name_an_axis_value():
    import pytest

    from nlsr.config import ConfigError, GridConfig, validate
    spec = {"name": "g", "base": "../default.yaml", "axes": {"scoring.method": ["lowrank", "wanda"]}}
    assert validate({**spec, "compare": {"scoring.method": "lowrank"}}, "g.yaml", GridConfig).compare
    for bad in ({"scoring.method": "snip"}, {"data.seed": 0}):
        with pytest.raises(ConfigError, match="compare"):
            validate({**spec, "compare": bad}, "g.yaml", GridConfig)


def seed_cell(seed: int, harmful: list[bool]) -> list[dict]:
    """One cell's rows, with per-prompt verdicts, as a grid of data seeds reports them."""
    from nlsr.stats import encode
    descriptor = {"name": "default", "task": "sst2", "poison_ratio": 0.2, "alignment": "dpo", "scorer": "lowrank",
                  "realign": "nlsr", "seed": 0, "data_seed": seed, "config_hash": f"cell{seed}"}
    evals = {"finetuned": {"harmful_score": 100 * sum(harmful) / len(harmful), "n_harmful": len(harmful),
                           "task_accuracy": 75.0, "n_task": 4},
             "realigned": {"harmful_score": 0.0, "n_harmful": len(harmful), "task_accuracy": 75.0, "n_task": 4}}
    verdicts = {"finetuned": {"harmful_score": encode(harmful), "task_accuracy": encode([True, True, True, False])},
                "realigned": {"harmful_score": encode([False] * len(harmful)),
                              "task_accuracy": encode([True, True, False, True])}}
    return [{**r, "config_hash": f"cell{seed}"} for r in
            report.cell_rows(descriptor, evals, {"finetuned": f"f{seed}", "realigned": f"r{seed}"}, verdicts)]


def test_rows_files_merge_parts_of_a_grid_into_one_report(tmp_path, capsys):
    """Two parts of one grid (data seed 0 here, seed 1 on another machine) written by write_results merge with
    `nlsr report --rows` into the table of the whole grid: intervals over both seeds and paired tests; a cell in
    two files is taken from the last one; bad files fail in one line naming the file."""
    from flows.cli import main
    from flows.results import file_rows
    part0 = report.write_results(seed_cell(0, [True] * 6 + [False] * 2), tmp_path / "part0")["rows_jsonl"]
    part1 = report.write_results(seed_cell(1, [True] * 4 + [False] * 4), tmp_path / "part1")["rows_jsonl"]
    stale = report.write_results(seed_cell(1, [False] * 8), tmp_path / "stale")["rows_jsonl"]
    rows = file_rows([stale, part0, part1])  # the stale seed-1 cell is replaced by the later part1
    assert sorted((r["data_seed"], r["variant"], r["harmful_score"]) for r in rows) == \
        [(0, "finetuned", 75.0), (0, "realigned", 0.0), (1, "finetuned", 50.0), (1, "realigned", 0.0)]
    finetuned = next(r for r in report.summarize(rows) if r["variant"] == "finetuned")
    assert finetuned["n_seeds"] == 2 and finetuned["harmful_score"] == 62.5
    assert finetuned["harmful_score_lo"] < 62.5 < finetuned["harmful_score_hi"]  # over prompts × seeds
    pair = next(p for p in report.paired(rows) if p["metric"] == "harmful_score")
    assert (pair["a"], pair["b"], pair["n_seeds"], pair["n_prompts"]) == ("realigned", "finetuned", 2, 8)  # prompts per seed
    assert (pair["a_only"], pair["b_only"], pair["diff"]) == (0, 10, -62.5)

    out = tmp_path / "merged"
    assert main(["report", "--rows", str(part0), "--rows", str(part1), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "4 rows" in printed.out and "warning" not in printed.err
    merged = report.read_csv(out / "summary.csv")
    assert [(r["variant"], r["n_seeds"], r["harmful_score"]) for r in merged] == \
        [("finetuned", 2, 62.5), ("realigned", 2, 0.0)]
    assert report.read_csv(out / "paired.csv")[0]["b_only"] == 10
    assert len((out / "rows.jsonl").read_text().splitlines()) == 4  # the merged table can be merged again

    # a part whose shared evaluation came out differently (another machine) is merged, with a warning
    other = seed_cell(1, [True] * 4 + [False] * 4)
    other[1]["eval_key"], other[1]["verdicts"]["task_accuracy"] = "r0", "0000"  # seed 0's realigned evaluation
    odd = report.write_results(other, tmp_path / "odd")["rows_jsonl"]
    assert main(["report", "--rows", str(part0), "--rows", str(odd), "--out", str(tmp_path / "odd-merged")]) == 0
    assert "warning: 1 evaluation(s) appear with different verdicts (r0)" in capsys.readouterr().err

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"variant": "finetuned", "harmful_score": 1}\n[1, 2]\n')
    for args, message in ((["--rows", str(tmp_path / "nope.jsonl")], "nope.jsonl: no such file"),
                          (["--rows", str(bad)], "bad.jsonl, line 2: expected a result row"),
                          (["--rows", str(part0), "--experiment", "nlsr/x"], "expected one source of rows")):
        assert main(["report", *args, "--out", str(tmp_path / "never")]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "never").exists()


def test_grid_only_selects_cells_by_axis_values():
    import pytest

    from nlsr.config import ConfigError, GridConfig, validate
    grid = validate({"name": "g", "base": "../default.yaml",
                     "axes": {"data.seed": [0, 1, 2], "realign.layer_rate": [0.3, 0.5]}}, "g.yaml", GridConfig)
    assert grid.selected(None) == [True] * 6
    assert grid.selected(["data.seed=1"]) == [False, False, True, True, False, False]
    assert grid.selected(["data.seed=0", "data.seed=2", "realign.layer_rate=0.5"]) == \
        [False, True, False, False, False, True]
    with pytest.raises(ConfigError, match=r"--only data\.seed=3: expected one of the values of axes\.data\.seed "
                                          r"\[0, 1, 2\], got 3"):
        grid.selected(["data.seed=3"])
    with pytest.raises(ConfigError, match=r"'seed' is not an axis of grid g; expected one of \['data.seed', "):
        grid.selected(["seed=0"])


def method_rows(task: str = "sst2") -> list[dict]:
    """Two alignment methods over two seeds (shift ±2, so the means are the centre values)."""
    out = []
    for method, scores in (("sft", {"aligned": 20, "finetuned": 60, "realigned": 40}),
                           ("dpo", {"aligned": 0, "finetuned": 40, "realigned": 12})):
        for seed, shift in ((0, -2.0), (1, 2.0)):
            for variant, hs in scores.items():
                out.append({"task": task, "poison_ratio": 0.2, "alignment": method, "scorer": "lowrank",
                            "realign": "nlsr", "seed": 0, "data_seed": seed, "variant": variant,
                            "harmful_score": hs + shift, "task_accuracy": 70.0 + shift})
    return out


def test_pivot_lays_out_one_column_per_axis_value(tmp_path, capsys):
    """The paper's layout: sft removes (60 − 40) / (60 − 20) = 50 % of the fine-tuning's increase, dpo
    (40 − 12) / (40 − 0) = 70 %, mean 60 %; the columns follow the order given, the summary's order without one."""
    import pytest

    from flows.cli import main
    summary = report.summarize(method_rows())
    table = report.pivot(summary, "alignment.method", ["sft", "dpo", "kto"])  # kto: no rows, no column
    assert [r["row"] for r in table] == ["aligned: harmful score", "finetuned: harmful score",
                                         "realigned: harmful score", "realigned: share of the increase removed",
                                         "aligned: task accuracy", "finetuned: task accuracy",
                                         "realigned: task accuracy"]
    removed = table[3]
    assert (removed["sft"], removed["dpo"], removed["mean"]) == (50.0, 70.0, 60.0) and "kto" not in removed
    assert list(report.pivot(summary, "alignment")[0])[2:] == ["dpo", "sft", "mean"]
    steps = report.summarize([{**r, "alignment": "dpo", "finetune.max_steps": s} for r in method_rows()[:6]
                              for s in (9, 10)])
    assert list(report.pivot(steps, "finetune.max_steps")[0])[2:] == ["9", "10", "mean"]  # by value, not as text
    text = report.pivot_markdown(table)
    assert "|  | sft | dpo | mean |" in text and "| realigned: share of the increase removed | 50 % | 70 % | 60 % |" in text
    assert "| finetuned: harmful score | 60.0 | 40.0 | 50.0 |" in text
    with pytest.raises(ValueError, match="also differ in task"):
        report.pivot(report.summarize(method_rows() + method_rows("agnews")), "alignment.method")

    paths = report.write_results(method_rows(), tmp_path / "out", pivots={"alignment.method": ["sft", "dpo"]})
    assert [r["row"] for r in report.read_csv(paths["pivot-alignment.method"])][3].startswith("realigned: share")
    assert text in paths["markdown"].read_text()

    rows = report.write_results(method_rows(), tmp_path / "parts")["rows_jsonl"]
    assert main(["report", "--rows", str(rows), "--out", str(tmp_path / "cli"), "--pivot",
                 "alignment.method=sft,dpo"]) == 0
    assert text in capsys.readouterr().out
    for spec, message in (("alignment.method=sft,simpo", "no rows with alignment.method = simpo (values: dpo, sft)"),
                          ("alignment.methd", "--pivot alignment.methd: not a column")):
        assert main(["report", "--rows", str(rows), "--out", str(tmp_path / "never"), "--pivot", spec]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "never").exists()


def test_pivot_leaves_a_share_of_a_chance_increase_blank(tmp_path):
    """Over 64 prompts: at p 0.05 the fine-tuning adds 2 harmful answers to the aligned model's 1 (exact McNemar
    p = 0.5, not significant), so 'NLSR removed 200 %' would mean nothing: blank. At p 0.2 it adds 20 (p 2e-6):
    (21 - 6) / (21 - 1) = 75 % removed. The mean needs every column."""
    from nlsr.stats import encode
    counts = {0.05: {"aligned": 1, "finetuned": 3, "realigned": 0}, 0.2: {"aligned": 1, "finetuned": 21, "realigned": 6}}
    rows = [{"task": "sst2", "poison_ratio": ratio, "alignment": "dpo", "scorer": "lowrank", "realign": "nlsr",
             "seed": 0, "data_seed": 0, "variant": variant, "harmful_score": 100 * k / 64, "task_accuracy": 70.0,
             "verdicts": {"harmful_score": encode([i < k for i in range(64)])}}  # nested: the same first prompts
            for ratio, by_variant in counts.items() for variant, k in by_variant.items()]
    summary, pairs = report.summarize(rows), report.paired(rows)
    share = {r["row"]: r for r in report.pivot(summary, "data.poison_ratio", None, pairs)}[
        "realigned: share of the increase removed"]
    assert share["0.05"] is None and share["0.2"] == 75.0 and share["mean"] is None
    assert report.pivot(summary, "data.poison_ratio")[3]["0.05"] == 150.0  # without the tests: (3 - 0) / (3 - 1)
    text = report.write_results(rows, tmp_path, pivots={"data.poison_ratio": None})["markdown"].read_text()
    assert "| realigned: share of the increase removed |  | 75 % |  |" in text
    assert "blank where the fine-tuning's increase is not significant, exact McNemar p ≥ 0.05" in text


def test_grid_pivot_must_be_the_one_axis_besides_seeds():
    import pytest

    from nlsr.config import ConfigError, GridConfig, validate
    spec = {"name": "g", "base": "../default.yaml", "axes": {"alignment.method": ["sft", "dpo"], "data.seed": [0, 1]}}
    assert validate({**spec, "pivot": "alignment.method"}, "g.yaml", GridConfig).pivots() == \
        {"alignment.method": ["sft", "dpo"]}
    assert validate(spec, "g.yaml", GridConfig).pivots() == {}
    for bad, message in (({"pivot": "scoring.method"}, "pivot: expected one of the axes"),
                         ({"pivot": "alignment.method", "axes": {**spec["axes"], "data.poison_ratio": [0.1, 0.2]}},
                          "the axes data.poison_ratio vary too")):
        with pytest.raises(ConfigError, match=message):
            validate({**spec, **bad}, "g.yaml", GridConfig)


def test_coincident_points_get_one_label_without_the_knob_that_does_not_move_them():
    """The aligned model of every P_L is one evaluation at one place: one label ('orpo'), not three on top of
    each other; realigned points that P_L moves keep their value."""
    rows = [{"variant": v, "harmful_score": hs, "task_accuracy": 70.0, "alignment": "orpo", "realign.layer_rate": rate}
            for rate, hs in ((0.3, 40.0), (0.5, 45.0)) for v, hs in (("aligned", 18.0), ("realigned", hs))]
    groups = report._coincident(rows)
    labels = {g[0]["variant"] + str(g[0]["harmful_score"]): report._knob_label(g, ["realign.layer_rate", "alignment"])
              for g in groups}
    assert labels == {"aligned18.0": "orpo", "realigned40.0": "0.3, orpo", "realigned45.0": "0.5, orpo"}


def test_a_defense_that_changed_nothing_is_labelled_with_the_model_it_covers():
    """SafeLoRA projecting no module is the fine-tuned model again: drawn over it, its label names both."""
    rows = [{"variant": v, "harmful_score": hs, "task_accuracy": acc}
            for v, hs, acc in (("aligned", 30.0, 54.0), ("finetuned", 44.3, 82.7), ("safelora", 44.3, 82.7),
                               ("realigned", 34.6, 80.0))]
    assert report.place_label(rows[2], rows) == report.place_label(rows[1], rows) == "finetuned = safelora"
    assert report.place_label(rows[3], rows) == "realigned"


def test_nearby_labels_are_moved_apart_and_distant_ones_stay():
    """Four P_L labels of points at one place (ORPO's fine-tuned model realigned by P_SR 0.8 at every P_L) would
    print on top of each other: each goes below the last; a label far away keeps its place."""
    anchors = [(100.0, 200.0), (101.0, 200.0), (100.0, 199.0), (300.0, 50.0)]
    widths = [40.0, 40.0, 40.0, 40.0]
    drops = report.spread_labels(anchors, widths, 7.5)
    assert drops[3] == 0.0
    boxes = [(x, y - d, x + w, y - d + 7.5) for (x, y), w, d in zip(anchors, widths, drops)]
    for i in range(len(boxes)):
        for j in range(i):
            a, b = boxes[i], boxes[j]
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (i, j, drops)
    assert sorted(drops[:3]) == [0.0, 7.5, 15.0]
