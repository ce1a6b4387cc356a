"""The MLflow and Prefect UIs as a researcher meets them, in a real headless Chromium.

After a smoke cell and a 2-cell grid (run the way `nlsr run` / `nlsr grid` run them: a temporary Prefect API on a
Prefect home of their own, MLflow in SQLite under the artifact root), `flows.ui.start` (what `nlsr ui` runs)
starts the real `mlflow server` and `prefect server` on 127.0.0.1 on free ports (so not Prefect's 4200: the UI must
be told its API address). Chromium, Debian's package driven by Playwright with the system executable, then
opens the experiment, the runs list with the harmful-score columns, a run's results table, and the Prefect flow
runs with their results artifacts; screenshots go to $NLSR_SCREENSHOTS (default: the test's temp folder).

Marked `browser`: `pytest -m browser` runs it alone. Needs the `chromium` package (`.ci/run` installs it); without
it the test is skipped with the reason, except in CI (CI=true), where it fails.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
VARIANTS = ("aligned", "finetuned", "realigned", "safelora", "restore-modules")
TIMEOUT_MS = 60_000  # a busy 2-core CI machine renders the MLflow bundle slowly

pytestmark = [pytest.mark.browser, pytest.mark.xdist_group("browser")]

# One process, like a researcher's two commands: the smoke cell, then a grid over the poison ratio whose first
# cell is the smoke cell again (its stages are reused; it gets a run of its own under the grid's run).
RUNS = """
import sys, yaml
from pathlib import Path
from flows.cli import main
root, smoke = Path(sys.argv[1]), sys.argv[2]
common = [f"artifact_root={root}", "evaluation.judge=classifier"]
assert main(["run", smoke, *[a for c in common for a in ("--set", c)]]) == 0
grid = {"name": "browse", "base": smoke, "overrides": common, "axes": {"data.poison_ratio": [0.1, 0.2]}}
(root / "grid.yaml").write_text(yaml.safe_dump(grid))
assert main(["grid", str(root / "grid.yaml")]) == 0
"""


def chromium_path() -> str | None:
    """The system Chromium ($NLSR_CHROMIUM, Debian's binary, or one on PATH); never a Playwright download."""
    for candidate in (os.environ.get("NLSR_CHROMIUM"), "/usr/lib/chromium/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@pytest.fixture(scope="module")
def browser():
    exe = chromium_path()
    if exe is None:
        message = "no Chromium: apt-get install chromium (.ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, headless=True,
                               args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The runs, then both UIs on them; yields the URLs and the ids to open."""
    from flows import ui
    from flows.servers import base_env, free_port
    work = tmp_path_factory.mktemp("browse")
    root, home = work / "runs", work / "prefect-home"
    root.mkdir()
    # A fresh Prefect home: its temporary API server first creates the database, which can take minutes on a
    # loaded 2-core machine.
    env = base_env(PREFECT_HOME=str(home), OMP_NUM_THREADS="1", PREFECT_LOGGING_LEVEL="WARNING",
                   PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="600")
    for var in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        env.pop(var, None)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", RUNS, str(root), str(SMOKE)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    t1 = time.perf_counter()
    uis = ui.start(root, free_port(), free_port(), home=home)
    t2 = time.perf_counter()
    shots = Path(os.environ.get("NLSR_SCREENSHOTS") or work / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    print(f"runs {t1 - t0:.0f} s, servers {t2 - t1:.0f} s; screenshots in {shots}")
    try:
        yield {"uis": uis, "root": root, "home": home, "shots": shots, **_ids(root, home)}
    finally:
        uis.stop()


def _ids(root: Path, home: Path) -> dict:
    """The MLflow runs and the Prefect flow runs the test opens, read through the stores' own APIs."""
    from mlflow.tracking import MlflowClient
    mlc = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exps = {e.name: e for e in mlc.search_experiments()}
    grid_exp = exps["nlsr/browse"]
    runs = mlc.search_runs([grid_exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("nlsr.kind") == "grid")
    cells = [r for r in runs if r.data.tags.get("nlsr.kind") == "cell"]
    (single,) = mlc.search_runs([exps["nlsr/smoke"].experiment_id])
    return {"smoke_exp": exps["nlsr/smoke"], "grid_exp": grid_exp, "parent": parent, "cells": cells,
            "single": single}


def _page(browser, site):
    page = browser.new_page(viewport={"width": 1440, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    return page


def shot(page, site, name: str) -> Path:
    path = site["shots"] / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def _tidy(page) -> None:
    """Close MLflow's assistant side panel and the shared-view banner (they cover the table in screenshots)."""
    for name in ("Close", "Hide banner"):
        button = page.get_by_role("button", name=name)
        if button.count():
            button.first.click()


def test_mlflow_runs_table_shows_the_cells_with_their_harmful_scores(browser, site):
    uis, parent = site["uis"], site["parent"]
    page = _page(browser, site)
    # The results view `nlsr ui` prints: the runs table (not the GenAI overview) with harmful-score and accuracy
    # columns; the grid's cells are nested under the grid's run.
    url = uis.experiments["nlsr/browse"]
    assert "viewStateShareKey=nlsr-results" in url and "workflowType=machine_learning" in url
    page.goto(url)
    page.get_by_text(parent.info.run_name, exact=True).first.wait_for()
    assert "/runs" in page.url and "overview" not in page.url, page.url
    _tidy(page)
    for variant in VARIANTS:
        page.get_by_test_id(f"sort-header-hs/{variant}").wait_for()
    page.get_by_role("row").filter(has_text=parent.info.run_name).get_by_role("button").first.click()  # expand
    for run in site["cells"]:
        page.get_by_text(run.info.run_name, exact=True).first.wait_for()
    shot(page, site, "mlflow-runs")
    shown = page.inner_text("body")
    for run in site["cells"]:  # the cells' harmful scores are in the table (values as MLflow prints them)
        assert f"{run.data.metrics['hs/realigned']:g}" in shown and f"{run.data.metrics['hs/aligned']:g}" in shown
    page.close()


def _run_page(browser, site, run, *texts: str):
    """A run's page in the MLflow UI, once each text shows (its description: the results table)."""
    page = _page(browser, site)
    page.goto(f"{site['uis'].mlflow}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
              f"?workflowType=machine_learning")
    for text in texts:
        page.get_by_text(text).first.wait_for()
    _tidy(page)
    return page


def test_mlflow_run_page_shows_its_results_table(browser, site):
    page = _run_page(browser, site, site["single"], "harmful score ⬇")
    if page.get_by_text("Show more").count():
        page.get_by_text("Show more").first.click()
    page.get_by_text("restore-modules").first.wait_for()
    page.get_by_text("poison ratio").first.wait_for()
    shot(page, site, "mlflow-run")
    page.close()


def test_mlflow_grid_run_shows_the_grid_table(browser, site):
    page = _run_page(browser, site, site["parent"], "grid browse: 2 cells", "harmful score ⬇")
    shot(page, site, "mlflow-grid-run")
    page.close()


def _flow_runs(home: Path, api: str) -> dict[str, str]:
    """Flow run name -> id, from the Prefect server the UI talks to."""
    import httpx
    resp = httpx.post(f"{api}/flow_runs/filter", json={"limit": 50}, timeout=30)
    resp.raise_for_status()
    return {r["name"]: r["id"] for r in resp.json()}


def test_prefect_flow_runs_are_named_and_carry_their_results(browser, site):
    from nlsr.config import load_config
    from tasks.ui_artifacts import artifact_key, cell_title
    uis = site["uis"]
    runs = _flow_runs(site["home"], uis.prefect + "/api")
    title = cell_title(load_config(SMOKE, ["evaluation.judge=classifier"]))
    assert title in runs and "grid browse" in runs, runs  # the cell and the grid by name, not 'smoky-dove'
    assert any(name.startswith("sst2 p=0.2") and "[browse]" in name for name in runs), runs
    page = _page(browser, site)
    page.goto(f"{uis.prefect}/runs")
    page.get_by_text(title, exact=True).first.wait_for()
    assert page.get_by_text("Can't connect").count() == 0  # the UI found its API on this non-4200 port
    shot(page, site, "prefect-runs")
    for name in (title, "grid browse"):
        page.goto(f"{uis.prefect}/runs/flow-run/{runs[name]}")
        page.get_by_text("Artifacts", exact=True).first.click()
        card = page.get_by_text(artifact_key(("cell-" + name) if name == title else "nlsr-grid-browse"), exact=True)
        card.first.click()  # the artifact's page renders its Markdown
        page.get_by_text("harmful score ⬇").first.wait_for()
        page.get_by_text("restore-modules").first.wait_for()
        shot(page, site, "prefect-cell-artifact" if name == title else "prefect-grid-artifact")
    page.close()
