"""The method's own commands, usable without any server:

  nlsr reference --base B --aligned ADAPTER --beta 0.9 [--mode paper|code] --out DIR
  nlsr score     --base B --reference ADAPTER --calibration FILE.jsonl --method lowrank --sparsity 0.8 --out MASKS
  nlsr realign   --base B --reference ADAPTER --finetuned ADAPTER --masks MASKS --out DIR [--method nlsr|...]
  nlsr realign   --base B --finetuned ADAPTER --method antidote --density 0.1 --out DIR
  nlsr realign   --finetuned ADAPTER --aligned ADAPTER --unaligned ADAPTER --method resta --gamma 1 --out DIR

B is a model folder, 'embedded' or 'tiny'. Each command prints a short summary and writes a JSON report next to
its output (DIR/reference_report.json, MASKS with suffix .report.json, DIR/realign_report.json).
"""
from __future__ import annotations

from pathlib import Path

from nlsr.methods import REALIGNERS, SCORERS

from .outputs import add_force, check_out_file, check_out_folder, mark_out_folder


def add_commands(sub) -> None:
    _add_reference(sub)
    _add_score(sub)
    _add_realign(sub)


def _base_args(p, required: bool = True) -> None:
    p.add_argument("--base", required=required, help="'embedded', 'tiny' or a Hugging Face model folder")
    p.add_argument("--artifact-root", default="runs", help="where 'embedded' / 'tiny' bases are built and cached")


def _config(cls, values: dict):
    """A validated config section from command-line values (out-of-range values fail as ConfigError)."""
    from nlsr.config import validate
    return validate({k: v for k, v in values.items() if v is not None}, "the command line", cls)


def _existing(path: str, what: str) -> Path:
    from nlsr.errors import NLSRError
    p = Path(path)
    if not p.exists():
        raise NLSRError(f"{what} {p} does not exist")
    return p


# ---------------------------------------------------------------------------------------------- reference

def _add_reference(sub) -> None:
    p = sub.add_parser("reference", help="build the safety reference adapter (pre-amplified aligned LoRA)")
    _base_args(p, required=False)
    p.add_argument("--aligned", required=True, help="the aligned LoRA adapter folder")
    p.add_argument("--beta", type=float, default=None, help="pre-amplification coefficient β (default 0.9)")
    p.add_argument("--mode", choices=["paper", "code"], default=None,
                   help="paper: ΔW_e = (1+β)ΔW_a (default); code: both factors × 2β as released")
    p.add_argument("--out", required=True, help="output adapter folder")
    add_force(p)
    p.set_defaults(func=_reference)


def _reference(args) -> int:
    from nlsr.config import ReferenceConfig
    from nlsr.modeling import resolve_base
    from nlsr.realign import check_base
    from nlsr.reference import REPORT_NAME, build_reference
    cfg = _config(ReferenceConfig, {"beta": args.beta, "mode": args.mode})
    aligned = _existing(args.aligned, "aligned adapter")
    if args.base:
        check_base(resolve_base(args.base, args.artifact_root), aligned)
    check_out_folder(args.out, "reference", args.force)
    rep = build_reference(aligned, Path(args.out), cfg)
    mark_out_folder(args.out, "reference")
    print(f"reference adapter {args.out}: {rep['n_modules']} modules, mode {rep['mode']}, β {rep['beta']}: "
          f"A × {rep['scale_A']:g}, B × {rep['scale_B']:g}, ΔW × {rep['delta_w_scale']:g} "
          f"(report {Path(args.out) / REPORT_NAME})")
    return 0


# ---------------------------------------------------------------------------------------------- score

def _add_score(sub) -> None:
    p = sub.add_parser("score", help="find the safety-critical neurons of a reference adapter (mask file)")
    _base_args(p)
    p.add_argument("--reference", required=True, help="the safety reference adapter folder")
    p.add_argument("--calibration", default=None,
                   help="JSONL with 'prompt' and 'response' fields, or 'reference': the reference model answers "
                        "risky prompts and the judge keeps the safe answers (default: the shipped safe answers)")
    p.add_argument("--judge", default="classifier",
                   help="registered judge that filters the answers of --calibration reference (classifier, "
                        "keyword, hf, ...; `nlsr judge --help` lists them)")
    p.add_argument("--judge-path", default=None, help="local model folder for judges that need one (--judge hf)")
    p.add_argument("--calibration-pool", type=int, default=None,
                   help="--calibration reference: prompts answered before filtering (2 × n-samples)")
    p.add_argument("--method", choices=SCORERS.names(), default=None)
    p.add_argument("--sparsity", type=float, default=None, help="P_SR: the mask keeps the top (1 - sparsity)")
    p.add_argument("--n-samples", type=int, default=None, help="calibration rows used (seeded draw)")
    p.add_argument("--max-length", type=int, default=None, help="response tokens per sample")
    p.add_argument("--rank-rule", choices=["code", "paper"], default=None)
    p.add_argument("--calibration-format", choices=["paper", "code"], default=None,
                   help="paper: '### Response:\\n' + the whole answer (default); code: the release's formatting "
                        "(no newline, the answer's first token dropped)")
    p.add_argument("--granularity", choices=["global", "row"], default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--template", choices=["alpaca", "chat"], default="alpaca")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--out", required=True, help="output mask file (.safetensors)")
    p.set_defaults(func=_score)


def _score(args) -> int:
    from nlsr import data
    from nlsr.config import ScoringConfig
    from nlsr.modeling import resolve_base
    from nlsr.scoring import report_path, score_neurons
    generated = args.calibration == "reference"
    if generated:  # a bad judge name fails before any model loads
        from nlsr.judges import check_judge
        check_judge(args.judge, args.judge_path)
    cfg = _config(ScoringConfig, {"method": args.method, "sparsity": args.sparsity, "n_samples": args.n_samples,
                                  "max_length": args.max_length, "rank_rule": args.rank_rule,
                                  "granularity": args.granularity, "seed": args.seed,
                                  "calibration_format": args.calibration_format,
                                  "calibration": "reference" if generated else None,
                                  "calibration_pool": args.calibration_pool})
    check_out_file(args.out, "score")
    reference = _existing(args.reference, "reference adapter")
    base = resolve_base(args.base, args.artifact_root)
    info = {"calibration": args.calibration or "safe"}
    if generated:
        from nlsr.calibration import CALIBRATION_FILE, reference_answers
        from nlsr.judges import get_judge
        judge = get_judge(args.judge, artifact_root=args.artifact_root, path=args.judge_path, device=args.device)
        rows, info = reference_answers(base, reference, cfg, judge, template=args.template, device=args.device,
                                       dtype=args.dtype, save_to=Path(args.out).parent)
        print(f"calibration: the reference model answered {info['calibration_answered']} prompts, the {args.judge} "
              f"judge kept {info['calibration_safe']} ({Path(args.out).parent / CALIBRATION_FILE})")
    elif args.calibration:
        rows = data.read_jsonl(_existing(args.calibration, "calibration file"), required=("prompt", "response"))
    else:
        rows = data.calibration_set(cfg.n_samples, seed=cfg.seed)
    rep = score_neurons(base, reference, rows, cfg, Path(args.out), args.template, args.device, args.dtype, info)
    print(f"masks {args.out}: {rep['n_masks']} factors, method {rep['method']}, kept {rep['kept_fraction']:.3f} "
          f"of entries, {rep['n_samples']} samples / {rep['response_tokens']} response tokens, "
          f"{rep['wall_s']:.1f} s (report {report_path(Path(args.out))})")
    return 0


# ---------------------------------------------------------------------------------------------- realign

def _add_realign(sub) -> None:
    p = sub.add_parser("realign", help="a post-fine-tuning defense on a fine-tuned adapter (training-free): "
                                       + ", ".join(REALIGNERS.names()))
    _base_args(p, required=False)
    p.add_argument("--finetuned", required=True, help="the fine-tuned adapter folder (read only)")
    p.add_argument("--out", required=True, help="output adapter folder")
    p.add_argument("--method", choices=REALIGNERS.names(), default=None, help="default nlsr")
    p.add_argument("--reference", default=None, help="nlsr, safelora, restore-modules: the safety reference adapter")
    p.add_argument("--masks", default=None, help="nlsr: mask file from `nlsr score`")
    p.add_argument("--aligned", default=None, help="resta, resta-base: the aligned adapter")
    p.add_argument("--unaligned", default=None, help="resta: the unaligned adapter (aligned + harmful fine-tuning)")
    p.add_argument("--layer-rate", type=float, default=None, help="P_L, base pruning probability (0.5)")
    p.add_argument("--epsilon", type=float, default=None, help="ε, probability spread by similarity rank (0.2)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--direction", choices=["paper", "code"], default=None)
    p.add_argument("--tau", type=float, default=None, help="SafeLoRA similarity threshold τ (0.6)")
    p.add_argument("--density", type=float, default=None, help="antidote: share of each factor row pruned (0.1)")
    p.add_argument("--calibration-set", choices=["pure_bad", "harmful_dev"], default=None,
                   help="antidote: harmful calibration rows (pure_bad)")
    p.add_argument("--n-samples", type=int, default=None, help="antidote: calibration rows (128)")
    p.add_argument("--gamma", type=float, default=None, help="resta: weight γ of the safety vector (1.0)")
    p.add_argument("--dare-rate", type=float, default=None, help="resta: DARE drop rate on the task delta (0)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    add_force(p)
    p.set_defaults(func=_realign)


_WHAT = {"reference": "reference adapter", "finetuned": "fine-tuned adapter", "masks": "mask file",
         "aligned": "aligned adapter", "unaligned": "unaligned adapter"}


def _realign(args) -> int:
    from nlsr.config import ExperimentConfig
    from nlsr.errors import NLSRError
    from nlsr.modeling import resolve_base
    from nlsr.realign import REPORT_NAME
    method = args.method or "nlsr"
    values = {"method": method, "layer_rate": args.layer_rate, "epsilon": args.epsilon, "seed": args.seed,
              "direction": args.direction, "safelora_tau": args.tau,
              "antidote": {k: v for k, v in {"density": args.density, "calibration": args.calibration_set,
                                             "n_samples": args.n_samples}.items() if v is not None},
              "resta": {k: v for k, v in {"gamma": args.gamma, "dare_rate": args.dare_rate}.items() if v is not None}}
    cfg = _config(ExperimentConfig, {"realign": {k: v for k, v in values.items() if v is not None},
                                     "model": {"device": args.device, "dtype": args.dtype}})
    meta = REALIGNERS.meta(method)
    given = {"reference": args.reference, "masks": args.masks, "aligned": args.aligned, "unaligned": args.unaligned,
             "finetuned": args.finetuned}
    paths = {}
    for name, source in meta["inputs"].items():
        if name == "base":
            continue
        if source is None:
            paths[name] = None
        elif given.get(name) is None:
            raise NLSRError(f"--method {method} needs --{name}")
        else:
            paths[name] = _existing(given[name], _WHAT.get(name, name))
    if meta.get("runs_model") and not args.base:
        raise NLSRError(f"--method {method} runs the model: it needs --base")
    paths["base"] = resolve_base(args.base, args.artifact_root) if args.base else None
    check_out_folder(args.out, "realign", args.force)
    rep = REALIGNERS.get(method)(paths, cfg, Path(args.out), method)
    mark_out_folder(args.out, "realign")
    print(f"realigned adapter {args.out}: method {rep['method']}, patched {rep['n_patched']}/{rep['n_modules']} "
          f"modules, {rep['entries_changed']} entries changed (report {Path(args.out) / REPORT_NAME})")
    return 0
