"""`nlsr run | grid | report | deploy | ui`: the orchestration commands (plugged into flows/cli.py).

No server is needed for `run`, `grid` (without --pool) and `report`: Prefect starts a temporary local API and
MLflow writes to SQLite under the artifact root. Heavy imports happen inside the commands.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def add_commands(sub) -> None:
    p = sub.add_parser("run", help="run one experiment cell (all stages, cached) and print its results")
    p.add_argument("config", nargs="?", default=None, help="experiment YAML (default: the built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set data.poison_ratio=0.1 (repeatable)")
    p.add_argument("--verify", action="store_true",
                   help="hash every file of every reused artifact (default: check sizes, and hashes of files up "
                        "to 64 MiB)")
    p.add_argument("--debug", action="store_true",
                   help="print full tracebacks on the console (they always go to <artifact_root>/logs/)")
    p.set_defaults(func=_run)

    g = sub.add_parser("grid", help="run a grid of cells (locally, or on a Prefect work pool with --pool)")
    g.add_argument("grid", help="grid YAML (configs/grids/*.yaml)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to every cell (repeatable)")
    g.add_argument("--base", default=None, metavar="CONFIG",
                   help="run the grid on this experiment YAML instead of the grid's own base (the grid is then "
                        "named <grid>-on-<CONFIG stem>)")
    g.add_argument("--pool", default=None, help="submit cells to this work pool (needs PREFECT_API_URL and "
                                                "`nlsr deploy`); default: run them here, one after another")
    g.add_argument("--deployment", default=None, help="deployment to submit to (default: nlsr-cell/nlsr-cell)")
    g.add_argument("--timeout", type=float, default=None, help="seconds to wait for submitted cells")
    g.add_argument("--only", action="append", default=[], metavar="AXIS=VALUE",
                   help="run only the cells with this value of a grid axis, e.g. --only data.seed=0 (repeatable); "
                        "the table still holds every finished cell of the grid")
    g.set_defaults(func=_grid)

    r = sub.add_parser("report", help="print the results table and write the plot")
    r.add_argument("--root", default="runs", help="artifact root (default: runs)")
    r.add_argument("--experiment", default=None,
                   help="only the cells of this MLflow experiment (e.g. nlsr/table1-sst2); default: every "
                        "finished cell under --root")
    r.add_argument("--tracking-uri", default=None, help="MLflow URI for --experiment (default: as `nlsr run`)")
    r.add_argument("--out", default=None, help="output folder (default: <root>/reports/<experiment or all>)")
    r.add_argument("--compare", action="append", default=[], metavar="AXIS=VALUE",
                   help="also test each other value of this grid axis against VALUE, same variant, paired on the "
                        "prompts (e.g. scoring.method=lowrank; repeatable)")
    r.add_argument("--pivot", action="append", default=[], metavar="AXIS[=V1,V2,...]",
                   help="also print the paper's layout: one column per value of this grid axis (in this order and "
                        "only these, when given), e.g. alignment.method=sft,dpo,orpo,kto,simpo (repeatable)")
    r.add_argument("--rows", action="append", default=[], metavar="FILE",
                   help="report the rows of these rows.jsonl files (written beside every grid's and report's "
                        "results.csv, verdicts included) instead of a store: parts of one grid run on machines "
                        "that share no store merge into one table; a cell in several files: the last one wins "
                        "(repeatable)")
    r.add_argument("--labels", default=None, metavar="FILE",
                   help="score harmfulness by these labels made by reading the evaluations' answers (JSON lines: "
                        "eval_key, index, label; nlsr/reading.py) instead of by the judge, and add a table of how "
                        "far the judge was off per variant")
    r.set_defaults(func=_report)

    d = sub.add_parser("deploy", help="register the cell flow with a Prefect server for a work pool")
    d.add_argument("--pool", required=True, help="work pool name (created as a process pool if missing)")
    d.add_argument("--name", default="nlsr-cell", help="deployment name (default: nlsr-cell)")
    d.add_argument("--source", default=None, help="code location the workers load (default: this checkout)")
    d.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="job variable env for the flow runs, e.g. CUDA_VISIBLE_DEVICES=0 (repeatable)")
    d.set_defaults(func=_deploy)

    u = sub.add_parser("ui", help="start the MLflow and Prefect UIs on the local runs (127.0.0.1) until Ctrl-C")
    u.add_argument("--root", default="runs", help="artifact root whose mlflow.db to browse (default: runs)")
    u.add_argument("--mlflow-port", type=int, default=5000, help="MLflow UI port (default 5000; busy: a free one)")
    u.add_argument("--prefect-port", type=int, default=4200, help="Prefect UI port (default 4200; busy: a free one)")
    u.add_argument("--print", dest="print_only", action="store_true", help="print the commands instead")
    u.add_argument("--start", action="store_true", help=argparse.SUPPRESS)  # the former opt-in; starting is default
    u.set_defaults(func=_ui)


# --------------------------------------------------------------------------------------------- run

def _root_override() -> list[str]:
    """$NLSR_ARTIFACT_ROOT (set in the compose stack: the shared /data volume) replaces the config's
    artifact_root; an explicit --set artifact_root=... still wins (it comes later)."""
    root = os.environ.get("NLSR_ARTIFACT_ROOT")
    return [f"artifact_root={root}"] if root else []


def _run(args) -> int:
    from nlsr.config import dump_yaml, load_config
    cfg = load_config(args.config, [*_root_override(), *args.overrides])
    print(f"# resolved config ({args.config or 'defaults'})\n{dump_yaml(cfg)}", flush=True)
    if args.verify:
        from nlsr.integrity import VERIFY_ENV
        os.environ[VERIFY_ENV] = "full"
    _prestart_prefect(cfg)
    t0 = time.perf_counter()
    from flows.cell import cell
    from flows.runlog import one_line, run_log, write_traceback
    from nlsr import report
    from nlsr.artifacts import ArtifactStore
    from tasks.tracking import experiment_name, tracking_uri
    log_file = ArtifactStore(cfg.artifact_root).root / "logs" / f"run-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log"
    with run_log(log_file, args.debug):
        try:
            rows = cell(cfg)
        except Exception as err:
            write_traceback(err, log_file)
            if args.debug:
                raise
            print(f"nlsr run: error: {one_line(err)}\n(traceback in {log_file}; or run again with --debug)",
                  file=sys.stderr)
            return 1
    print("\n" + report.markdown(rows, ("variant", "harmful_score", "task_accuracy")))
    pairs = report.paired_markdown(report.paired(rows))
    print(f"{report.interval_caption(report.summarize(rows))}\n" + (f"\n{pairs}" if pairs else ""))
    print(f"cell {cfg.name}: {time.perf_counter() - t0:.1f} s; artifacts under {Path(cfg.artifact_root).resolve()}")
    print(f"MLflow: experiment {experiment_name(cfg)!r} at {tracking_uri(cfg)}")
    return 0


PREFECT_SERVER_APP = "prefect.server.api.server:create_app"  # in the temporary server's command line


def _prestart_prefect(cfg=None) -> None:
    """Without PREFECT_API_URL, Prefect starts a temporary API server at the first flow call (7-20 s). Start it
    now, while a background thread imports torch / transformers / trl, so the two waits overlap.

    The server is started from this (main) thread only: Prefect's SubprocessASGIServer is a singleton whose
    start() is not thread-safe, and two threads starting it can leave an orphaned server process behind. A
    watchdog (flows.lifeline) stops it if this process is killed.
    """
    if os.environ.get("PREFECT_API_URL"):
        return
    import importlib
    import threading

    def heavy_imports():
        try:
            for name in ("torch", "transformers", "peft", "trl", "nlsr.training", "mlflow"):
                importlib.import_module(name)
            if cfg is not None:  # MLflow caches its SQL store per URI; opening it costs seconds
                from tasks.tracking import client, tracking_uri
                uri = tracking_uri(cfg)
                if uri.startswith("sqlite:"):
                    client(uri).search_experiments(max_results=1)
        except Exception:  # noqa: BLE001 - the stage that needs it will report the error
            return
    worker = threading.Thread(target=heavy_imports, daemon=True)
    worker.start()
    try:
        from filelock import FileLock
        from prefect.server.api.server import SubprocessASGIServer
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_ENABLED, get_current_settings

        from flows.lifeline import watch
        if PREFECT_SERVER_EPHEMERAL_ENABLED.value():
            # Two runs starting at once would both create (migrate) Prefect's SQLite database: one at a time.
            home = get_current_settings().home
            home.mkdir(parents=True, exist_ok=True)
            watch(match=PREFECT_SERVER_APP)  # no orphaned server after kill -9 of this process, even mid-start
            with FileLock(str(home / "nlsr-server-start.lock")):
                SubprocessASGIServer().start()  # the instance get_client() uses later
    finally:
        worker.join()


# --------------------------------------------------------------------------------------------- grid

def _grid(args) -> int:
    from nlsr import report
    from nlsr.config import load_grid
    grid = load_grid(args.grid)
    if args.base:
        grid = grid.on_base(args.base)
    overrides = [*_root_override(), *args.overrides]
    cells = grid.cells(Path(args.grid).parent, overrides)
    run_here = grid.selected(args.only)
    if grid.choose:
        from nlsr.choice import check_sweep
        check_sweep(grid, cells)  # dev data only, and a variant the cells evaluate: refused before any training
    print(f"grid {grid.name}: {len(cells)} cells over {', '.join(grid.axes) or 'no axes'}"
          + (f"; running the {sum(run_here)} with {' '.join(args.only)}" if args.only else ""), flush=True)
    if args.pool and not os.environ.get("PREFECT_API_URL"):
        print("nlsr grid: --pool needs a Prefect server: set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)",
              file=sys.stderr)
        return 2
    _prestart_prefect()
    from flows.grid import run_grid
    t0 = time.perf_counter()
    result = run_grid(grid.model_dump(mode="json"), str(Path(args.grid).parent.resolve()), overrides,
                      pool=args.pool, deployment=args.deployment, timeout=args.timeout, only=args.only)
    print("\n" + report.text_report(result["rows"], grid.compare, grid.pivots()))
    if result.get("choice"):
        from nlsr.choice import markdown
        print("\n" + markdown(result["choice"]))
    print(f"grid {grid.name}: {time.perf_counter() - t0:.1f} s; table and plot in {result['out']}")
    if result.get("not_run"):
        print(f"nlsr grid: {len(result['not_run'])} cell(s) not run yet (outside --only): {result['not_run']}")
    if result["failed"]:
        print(f"nlsr grid: {len(result['failed'])} cell(s) failed: {result['failed']}; run the same command "
              f"again to resume them (finished stages are reused)", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------------------------- report

def _report(args) -> int:
    from flows.results import collect_rows, disagreements, file_rows
    from nlsr import report
    from nlsr.config import parse_override
    compare = {".".join(key): value for key, value in map(parse_override, args.compare)}
    if args.rows and args.experiment:
        print("nlsr report: --rows and --experiment: expected one source of rows, not both", file=sys.stderr)
        return 2
    rows = file_rows(args.rows) if args.rows else collect_rows(args.root, args.experiment, args.tracking_uri)
    if not rows:
        print(f"nlsr report: no finished cells under {args.root}"
              + (f" in experiment {args.experiment!r}" if args.experiment else ""), file=sys.stderr)
        return 1
    appendix, title = "", args.experiment
    if args.labels:
        from nlsr import reading
        try:
            labels = reading.load_labels(args.labels)
            appendix = reading.appendix(rows, labels, args.labels)
            rows = reading.relabel(rows, labels)
            title = f"{args.experiment}: harmful scores by reading" if args.experiment else "Harmful scores by reading"
        except reading.LabelsError as e:
            print(f"nlsr report: --labels {e}", file=sys.stderr)
            return 2
    name = "rows" if args.rows else (args.experiment or "all").replace("/", "-")
    differ = disagreements(rows)
    if differ:
        print(f"nlsr report: warning: {len(differ)} evaluation(s) appear with different verdicts ({', '.join(differ)}):"
              f" the parts' shared stages differ (other hardware, code or lock file?)", file=sys.stderr)
    out = Path(args.out) if args.out else Path(args.root) / "reports" / name
    columns = {c for r in rows for c in r}
    for axis in compare:
        if report.axis_column(axis) not in columns:
            print(f"nlsr report: --compare {axis}: not a column of these results (columns: "
                  f"{', '.join(report.grouping(rows))})", file=sys.stderr)
            return 2
    pivots = {}
    summary = report.summarize(rows) if args.pivot else []
    for spec in args.pivot:
        axis, _, order = spec.partition("=")
        col = report.axis_column(axis)
        values = [v.strip() for v in order.split(",")] if order else None
        if col not in columns:
            print(f"nlsr report: --pivot {axis}: not a column of these results (columns: "
                  f"{', '.join(report.grouping(rows))})", file=sys.stderr)
            return 2
        present = {str(r.get(col)) for r in rows}
        unknown = [v for v in values or [] if v not in present]
        if unknown:
            print(f"nlsr report: --pivot {spec}: no rows with {axis} = {', '.join(unknown)} (values: "
                  f"{', '.join(sorted(present))})", file=sys.stderr)
            return 2
        try:  # the rows must differ in this axis alone: checked before anything is written
            report.pivot(summary, axis, values)
        except ValueError as e:
            print(f"nlsr report: --{e}", file=sys.stderr)
            return 2
        pivots[axis] = values
    paths = report.write_results(rows, out, title=title, compare=compare, pivots=pivots,
                                 appendix=appendix)
    print(report.text_report(rows, compare, pivots) + ("\n" + appendix if appendix else ""))
    print(f"{len(rows)} rows; tables: {paths['rows']}, {paths['summary']}, {paths['paired']}, {paths['markdown']}; "
          f"plot: {paths['plot']}")
    return 0


# --------------------------------------------------------------------------------------------- deploy, ui

def _deploy(args) -> int:
    if not os.environ.get("PREFECT_API_URL"):
        print("nlsr deploy: set PREFECT_API_URL to the Prefect server (e.g. http://127.0.0.1:4200/api)",
              file=sys.stderr)
        return 2
    from flows.deploy import deploy_cell
    env = dict(item.split("=", 1) for item in args.env)
    deployment_id = deploy_cell(args.pool, args.name, args.source, env)
    print(f"deployed nlsr-cell/{args.name} ({deployment_id}) on pool {args.pool}; start a worker with\n"
          f"  prefect worker start --pool {args.pool} --limit 1")
    return 0


def _ui(args) -> int:
    from flows import ui
    if args.print_only:
        print(ui.commands(args.root, args.mlflow_port, args.prefect_port))
        return 0
    return ui.serve(args.root, args.mlflow_port, args.prefect_port)
