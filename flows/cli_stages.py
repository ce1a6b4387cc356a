"""`nlsr align | finetune | evaluate`: one pipeline stage per command, no orchestration server.

  nlsr align configs/default.yaml --out runs/align            -> runs/align/w0 (SFT-merged) + runs/align/aligned
  nlsr align configs/default.yaml --defense vaccine --out a    -> aligned/ trained under an alignment-stage defense
  nlsr finetune configs/default.yaml --base runs/align/w0 --adapter runs/align/aligned --mix mix.jsonl --out ft
  nlsr evaluate configs/default.yaml --base runs/align/w0 --adapter ft --task sst2 --limit 100 --out eval.json

Heavy imports happen inside the commands, so `nlsr --help` stays instant. User errors raise NLSRError
subclasses, which flows.cli prints before exiting with status 2.
"""
from __future__ import annotations

import json
from pathlib import Path

from nlsr.methods import ALIGNMENT_DEFENSES

from .outputs import add_force, check_out_file, check_out_folder, mark_out_folder, written_by


def _config_args(p) -> None:
    p.add_argument("config", nargs="?", default=None, help="experiment YAML (default: built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override, repeatable (e.g. --set alignment.method=kto)")


def add_commands(sub) -> None:
    p = sub.add_parser("align", help="safety SFT merged into the base (W0), then preference alignment (adapter)")
    _config_args(p)
    p.add_argument("--base", default=None, help="'embedded', 'tiny' or a model folder (default: the config's model)")
    p.add_argument("--out", required=True, help="folder; gets w0/ (SFT-merged model) and aligned/ (adapter)")
    p.add_argument("--defense", default=None, choices=ALIGNMENT_DEFENSES.names(),
                   help="train aligned/ under this alignment-stage defense (its settings: the config's defenses: "
                        "section, e.g. --set defenses.vaccine.rho=2); default: undefended")
    add_force(p)
    p.set_defaults(func=_align)

    p = sub.add_parser("finetune", help="harmful fine-tuning on a poisoned mix, continuing the aligned adapter")
    _config_args(p)
    p.add_argument("--base", required=True, help="'embedded', 'tiny' or a model folder (usually W0)")
    p.add_argument("--adapter", required=True, help="adapter folder to continue, or 'none' for a fresh LoRA")
    p.add_argument("--mix", required=True, help="poisoned mix JSONL (nlsr data mix)")
    p.add_argument("--out", required=True, help="folder for the fine-tuned adapter")
    add_force(p)
    p.set_defaults(func=_finetune)

    p = sub.add_parser("evaluate", help="harmful score and task accuracy of base (+ adapter)")
    _config_args(p)
    p.add_argument("--base", required=True, help="'embedded', 'tiny' or a model folder")
    p.add_argument("--adapter", default="none", help="adapter folder, or 'none' (default)")
    p.add_argument("--task", default=None, help="sst2, agnews or gsm8k (default: the config's data.task)")
    p.add_argument("--limit", type=int, default=None, help="harmful prompts and task examples to score")
    p.add_argument("--judge", default=None, help="a registered judge: classifier, keyword, hf, ... (default: the config's)")
    p.add_argument("--out", required=True, help="metrics JSON file; samples go to a folder beside it")
    p.set_defaults(func=_evaluate)


def _load(args, extra: list[str] | None = None):
    from nlsr.config import load_config
    return load_config(args.config, list(args.overrides) + (extra or []))


def _base(spec: str | None, cfg) -> Path:
    from nlsr import modeling
    if spec is None:
        return modeling.base_folder(cfg.model, cfg.artifact_root)
    return modeling.resolve_base(spec, cfg.artifact_root)


def _adapter(spec: str) -> Path | None:
    if spec.lower() == "none":
        return None
    from nlsr.modeling import adapter_config
    adapter_config(spec)  # a clear error when the folder is not an adapter
    return Path(spec)


def _print(obj: dict) -> None:
    print(json.dumps({k: v for k, v in obj.items() if k != "losses"}, indent=2, default=str))


def _align(args) -> int:
    from nlsr import training
    # the defense joins the config, so validation rejects a combination it cannot train (Vaccine needs DPO)
    cfg = _load(args, [f"alignment.defenses=[{args.defense}]"] if args.defense else [])
    out = check_out_folder(args.out, "align", args.force)
    if args.force and out.is_dir() and written_by(out) != "align":
        import shutil
        shutil.rmtree(out)  # --force: the user asked to replace this folder (w0/ and aligned/ replace their own)
    sft = training.safety_sft(cfg, _base(args.base, cfg), out / "w0")
    align = training.preference_align if args.defense is None else ALIGNMENT_DEFENSES.get(args.defense)
    pref = align(cfg, out / "w0", out / "aligned")
    mark_out_folder(out, "align")
    _print({"w0": str(out / "w0"), "aligned": str(out / "aligned"), "aligned_base": pref["base"],
            "method": cfg.alignment.method, "defense": args.defense, "sft_wall_s": sft["wall_s"],
            "sft_train_loss": sft.get("train_loss"),
            "preference_wall_s": pref["wall_s"], "preference_train_loss": pref.get("train_loss")})
    return 0


def _finetune(args) -> int:
    from nlsr import training
    cfg = _load(args)
    check_out_folder(args.out, "finetune", args.force)
    result = training.finetune(cfg, _base(args.base, cfg), _adapter(args.adapter), Path(args.mix), Path(args.out))
    mark_out_folder(args.out, "finetune")
    _print({"adapter": args.out, **result})
    return 0


def _evaluate(args) -> int:
    from nlsr import evaluation
    from nlsr.atomic import write_json
    extra = [f"data.task={args.task}"] if args.task else []
    if args.limit is not None:
        extra += [f"evaluation.harmful_limit={args.limit}", f"evaluation.task_limit={args.limit}"]
    if args.judge:
        extra.append(f"evaluation.judge={args.judge}")
    cfg = _load(args, extra)  # validation names a bad task or judge
    out = check_out_file(args.out, "evaluate")
    metrics = evaluation.evaluate(cfg, _base(args.base, cfg), _adapter(args.adapter),
                                  out.with_name(out.stem + ".samples"))
    write_json(metrics, out)
    _print(metrics)
    return 0
