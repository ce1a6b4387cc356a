"""One Prefect task per stage: compute the artifact key, run the library function through the artifact store,
return a small `Ref` (stage, key, path, metrics). No tensors cross a task boundary.

Every task:
- is cached by the artifact store only (`policy.bind`: no Prefect cache, no pickled results); its log line says
  whether it was computed or reused;
- is idempotent on its own: `ArtifactStore.run` returns the finished artifact when `_SUCCESS` exists and holds a
  file lock on the key while computing, so concurrent cells never train the same thing twice;
- retries transient errors (I/O, network) twice, never out-of-memory or configuration errors;
- honours the testing hook NLSR_FAIL_STAGE=<stage> (see `policy.maybe_fail`).

Library modules are imported inside the tasks: importing this module stays cheap and needs no torch.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from nlsr.artifacts import ArtifactStore, Ref
from nlsr.config import ExperimentConfig
from nlsr.dag import MASKS_FILE, MIX_FILE, Step, artifact_path, run_step, variants  # noqa: F401 (re-exported)

from .keys import STAGE_VERSIONS, cell_descriptor, model_key, stage_config
from .policy import bind, call_key, maybe_fail, retry_transient, stage_inputs

STAGE_NOTE = "nlsr stage: "
RETRY = dict(retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_transient)


def _log(message: str) -> None:
    try:
        get_run_logger().info(message)
    except Exception:  # noqa: BLE001 - called outside a run (task.fn in a notebook): print instead
        print(message)


def run_stage(stage: str, params: dict, body: Callable[[Path], dict | None], output: str | None = None) -> Ref:
    """The common body of every stage task: key, store, failure hook, log line."""
    cfg: ExperimentConfig = params["cfg"]
    key = call_key(stage, params)
    store = ArtifactStore(cfg.artifact_root)
    meta = {"version": STAGE_VERSIONS[stage],
            "config": cell_descriptor(cfg) if stage == "report" else stage_config(stage, cfg, params.get("method")),
            "inputs": ({v: r.key for v, r in params["evals"].items()} if stage == "report"
                       else stage_inputs(params))}
    computed = []

    def fn(out: Path):
        computed.append(True)
        maybe_fail(stage, out if output is None else out.parent)
        return small_metrics(body(out) or {})

    try:
        ref = store.run(stage, key, fn, meta, output)
    except Exception as err:
        err.add_note(f"{STAGE_NOTE}{stage} {key}")  # `nlsr run` names the stage in its one-line error
        raise
    wall = ArtifactStore(cfg.artifact_root).meta(stage, key)["timings"]["wall_s"]
    _log(f"{stage} {key}: {'computed in %.1f s' % wall if computed else 'reused (artifact store hit)'} -> {ref.path}")
    return ref


def small_metrics(metrics: dict, max_list: int = 10_000) -> dict:
    """What a Ref carries: scalars, short lists (losses: (step, loss) pairs) and flat dicts of scalars. Bulky
    values (generated samples...) stay in the artifact folder."""
    def small(v, depth=0):
        if v is None or isinstance(v, (bool, int, float, str)):
            return True
        if isinstance(v, (list, tuple)):
            return len(v) <= max_list and depth < 2 and all(small(x, depth + 1) for x in v)
        if isinstance(v, dict):
            return len(v) <= 1000 and depth < 1 and all(small(x, depth + 1) for x in v.values())
        return False
    return {k: v for k, v in metrics.items() if small(v) and not (k == "samples" and isinstance(v, list))}


# --------------------------------------------------------------------------------------------- stages

@task(name="base", cache_policy=NO_CACHE, **RETRY)
def base(cfg: ExperimentConfig) -> Ref:
    """The raw base model folder (built once and cached by nlsr.modeling under <root>/models)."""
    from nlsr.modeling import base_folder
    try:
        return Ref(stage="base", key=model_key(cfg), path=str(base_folder(cfg.model, cfg.artifact_root)))
    except Exception as err:
        err.add_note(f"{STAGE_NOTE}base")
        raise


def _paths(refs: dict[str, Ref | None]) -> dict[str, Path | None]:
    """Input Refs as the paths the library reads (the file itself for one-file stages: mix, masks)."""
    return {name: artifact_path(r.stage, Path(r.path)) if r is not None else None for name, r in refs.items()}


def _library(stage: str, cfg: ExperimentConfig, refs: dict[str, Ref | None], method: str | None = None,
             judge: Callable | None = None) -> Callable[[Path], dict]:
    """The stage's library body (nlsr.dag.run_step), the same one the benchmark runs. `judge` is called inside the
    body only, so a cache hit never builds a judge."""
    step = Step(label=stage, stage=stage, inputs={k: k for k in refs}, method=method)
    return lambda out: run_step(step, cfg, _paths(refs), out, judge=judge() if judge else None)


@task(name="poison", **RETRY)
def poison(cfg: ExperimentConfig) -> Ref:
    return run_stage("poison", {"cfg": cfg}, _library("poison", cfg, {}))


@task(name="sft", **RETRY)
def sft(cfg: ExperimentConfig, base: Ref) -> Ref:
    """Alignment, part 1: safety SFT merged into the base (W0)."""
    return run_stage("sft", {"cfg": cfg, "base": base}, _library("sft", cfg, {"base": base}))


@task(name="align", **RETRY)
def align(cfg: ExperimentConfig, w0: Ref, method: str | None = None) -> Ref:
    """Alignment, part 2: the aligned LoRA adapter (cfg.alignment.method) on W0; `method` names an alignment-stage
    defense (nlsr.methods.ALIGNMENT_DEFENSES) that trains its own aligned adapter, None the undefended one."""
    params = {"cfg": cfg, "w0": w0, **({"method": method} if method else {})}
    return run_stage("align", params, _library("align", cfg, {"w0": w0}, method))


@task(name="reference", **RETRY)
def reference(cfg: ExperimentConfig, aligned: Ref) -> Ref:
    return run_stage("reference", {"cfg": cfg, "aligned": aligned}, _library("reference", cfg, {"aligned": aligned}))


@task(name="score", **RETRY)
def score(cfg: ExperimentConfig, base: Ref, reference: Ref) -> Ref:
    """Safety-critical neuron masks from the reference adapter and the calibration set."""
    refs = {"base": base, "reference": reference}
    return run_stage("score", {"cfg": cfg, **refs}, _library("score", cfg, refs), output=MASKS_FILE)


@task(name="finetune", **RETRY)
def finetune(cfg: ExperimentConfig, base: Ref, adapter: Ref | None, mix: Ref, method: str | None = None) -> Ref:
    """Harmful fine-tuning on the poisoned mix, continuing the aligned adapter (adapter None: Non-Aligned);
    `method` names a fine-tuning-stage defense (nlsr.methods.FINETUNE_DEFENSES), None the undefended attack."""
    refs = {"base": base, "adapter": adapter, "mix": mix}
    params = {"cfg": cfg, **refs, **({"method": method} if method else {})}
    return run_stage("finetune", params, _library("finetune", cfg, refs, method))


@task(name="unalign", **RETRY)
def unalign(cfg: ExperimentConfig, base: Ref, adapter: Ref) -> Ref:
    """RESTA's unaligned adapter: the aligned adapter continued on harmful-only rows."""
    refs = {"base": base, "adapter": adapter}
    return run_stage("unalign", {"cfg": cfg, **refs}, _library("unalign", cfg, refs))


@task(name="realign", **RETRY)
def realign(cfg: ExperimentConfig, method: str, inputs: dict[str, Ref | None]) -> Ref:
    """A post-fine-tuning defense (nlsr.methods.REALIGNERS) on the fine-tuned adapter; `inputs` by the names its
    registry entry gives (NLSR: base, reference, finetuned, masks)."""
    return run_stage("realign", {"cfg": cfg, "method": method, "inputs": inputs},
                     _library("realign", cfg, inputs, method))


@task(name="evaluate", **RETRY)
def evaluate(cfg: ExperimentConfig, base: Ref, adapter: Ref | None) -> Ref:
    """Harmful score and task accuracy of base + adapter (metrics.json, samples.jsonl with verdicts)."""
    refs = {"base": base, "adapter": adapter}
    return run_stage("evaluate", {"cfg": cfg, **refs}, _library("evaluate", cfg, refs, judge=lambda: _judge(cfg)))


def _judge(cfg: ExperimentConfig):
    """One judge per process and judge setting: a cell evaluates five variants, and building the classifier judge
    costs seconds. Built through the judge registry (nlsr.judges.get_judge)."""
    e = cfg.evaluation
    return _cached_judge(e.judge, str(cfg.artifact_root), e.judge_path, cfg.model.device)


@functools.lru_cache(maxsize=4)
def _cached_judge(name: str, root: str, path: str | None, device: str):
    from nlsr.judges import get_judge
    return get_judge(name, root, path, device)


@task(name="report", **RETRY)
def report(cfg: ExperimentConfig, evals: dict[str, Ref]) -> Ref:
    """The cell's results: rows.json (scores, 95 % intervals, per-prompt verdicts), results.csv/.md, paired.csv
    and the safety-vs-accuracy plot."""
    def body(out: Path) -> dict:
        import json
        from nlsr import report as rep
        from nlsr.data import read_jsonl
        from nlsr.evaluation import verdicts
        judged = {v: verdicts(read_jsonl(r.file("samples.jsonl")), cfg.evaluation.harmful_set)
                  for v, r in evals.items()}
        rows = rep.cell_rows(cell_descriptor(cfg), {v: r.metrics for v, r in evals.items()},
                             {v: r.key for v, r in evals.items()}, judged)
        defenses = variants(cfg)  # each row names its defense and the stage the defense acts at
        rows = [{**r, **defenses.get(r["variant"], {})} for r in rows]
        rep.write_results(rows, out, title=cfg.name)
        (out / "rows.json").write_text(json.dumps(rows, indent=2))
        return {"rows": rows}
    return run_stage("report", {"cfg": cfg, "evals": evals}, body)


STAGE_TASKS = {"poison": poison, "sft": sft, "align": align, "reference": reference, "score": score,
               "finetune": finetune, "unalign": unalign, "realign": realign, "evaluate": evaluate, "report": report}


def bound(root: str | Path) -> dict:
    """All stage tasks with their Prefect cache records under `root` (plus the uncached `base`)."""
    return {"base": base, **{name: bind(t, name, root) for name, t in STAGE_TASKS.items()}}
