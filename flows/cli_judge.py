"""`nlsr judge` (judge a JSONL file of answers) and `nlsr train-judge` (retrain a judge's shipped weights).

  nlsr judge --in pairs.jsonl --out verdicts.jsonl [--judge classifier] [--judge-path DIR] [--device auto]
  nlsr train-judge classifier
"""
from __future__ import annotations


def add_commands(sub) -> None:
    p = sub.add_parser("judge", help="judge (prompt, answer) rows of a JSONL file: adds harmful and p_harmful")
    p.add_argument("--in", dest="src", required=True, help="JSONL file, one object a line with 'prompt' and "
                   "'answer' strings (other fields are kept)")
    p.add_argument("--out", required=True, help="JSONL file to write: each row + 'harmful' (bool) and 'p_harmful' "
                   "(float, or null for judges without a probability)")
    p.add_argument("--judge", default="classifier", help="a registered judge (default classifier); an unknown "
                   "name lists the valid ones")
    p.add_argument("--judge-path", default=None, help="local model folder for judges that need one (--judge hf)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--batch-size", type=int, default=128, help="rows per judge call")
    p.add_argument("--artifact-root", default="runs", help="where a judge caches weights it has to train")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(func=_judge)

    t = sub.add_parser("train-judge", help="retrain a judge and rewrite its shipped weights (e.g. classifier)")
    t.add_argument("name", help="a registered judge with a training recipe (classifier)")
    t.add_argument("--device", default="cpu")
    t.set_defaults(func=_train)


def _judge(args) -> int:
    from nlsr.judges.files import judge_file
    s = judge_file(args.src, args.out, args.judge, args.judge_path, args.device, args.batch_size, args.force,
                   args.artifact_root)
    print(f"judged {s['n']} answers with {s['identity']}: {s['flagged']} harmful ({s['percent']:.1f} %) "
          f"in {s['wall_s']:.1f} s -> {s['out']}")
    return 0


def _train(args) -> int:
    import json

    from nlsr.judges import JudgeError, judge_spec
    spec = judge_spec(args.name)
    if spec.train is None:
        raise JudgeError(f"judge {args.name!r} has no training recipe (nothing to retrain)")
    print(json.dumps(spec.train(device=args.device), indent=2))
    return 0
