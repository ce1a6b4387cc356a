"""The `nlsr` command line. Each group of sub-commands lives in its own module; heavy imports happen inside the
command, so `nlsr --help` is instant.

  nlsr generate --prompt "What is the capital of France?"      first sign of life (embedded SmolLM2)
  nlsr data mix --task sst2 --n 1000 --p 0.05 --seed 0 --out mix.jsonl
"""
from __future__ import annotations

import argparse
import sys

from nlsr.env import offline_defaults


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="greedy answer from a base model (default: the embedded SmolLM2)")
    p.add_argument("--prompt", required=True, action="append", help="instruction (repeatable)")
    p.add_argument("--base", default="embedded", help="'embedded', 'tiny' or a model folder")
    p.add_argument("--adapter", default=None, help="optional LoRA adapter folder")
    p.add_argument("--template", default="alpaca", choices=["alpaca", "chat"])
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--artifact-root", default="runs")
    p.set_defaults(func=_generate)


def _generate(args) -> int:
    from nlsr import modeling
    from nlsr.data import format_prompt
    from nlsr.generation import generate
    folder = modeling.resolve_base(args.base, args.artifact_root)
    model, tok = modeling.load_model(folder), modeling.load_tokenizer(folder)
    if args.adapter:
        model = modeling.load_adapter(model, args.adapter)
    prompts = [format_prompt(p, "", args.template, tok) for p in args.prompt]
    for prompt, answer in zip(args.prompt, generate(model, tok, prompts, args.max_new_tokens)):
        print(answer if len(args.prompt) == 1 else f"> {prompt}\n{answer}\n")
    return 0


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="data sets: poisoned mixes")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    m = dsub.add_parser("mix", help="write a poisoned fine-tuning mix as JSONL")
    m.add_argument("--task", required=True, help="sst2, agnews or gsm8k")
    m.add_argument("--n", type=int, required=True, help="rows in the mix")
    m.add_argument("--p", type=float, required=True, help="poison ratio in [0, 1]")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--poison-source", default="beavertails", help="beavertails or pure_bad")
    m.add_argument("--out", required=True)
    m.set_defaults(func=_data_mix)


def _data_mix(args) -> int:
    from nlsr.data import poison_mix, write_jsonl
    rows = poison_mix(args.task, args.n, args.p, args.seed, args.poison_source)
    write_jsonl(rows, args.out)
    k = sum(r["flag"] == "unsafe" for r in rows)
    print(f"wrote {len(rows)} rows to {args.out}: {len(rows) - k} {args.task} + {k} poison "
          f"({args.poison_source}), seed {args.seed}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nlsr", description="Neuron-Level Safety Realignment (NLSR): poison, "
                                     "align, fine-tune, find safety-critical neurons, realign, evaluate.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(sub)
    _add_data(sub)
    for module in _command_modules():
        module.add_commands(sub)
    return parser


def _command_modules():
    """Optional command groups (method, stages, flows, judge), each a module with add_commands(sub)."""
    import importlib
    mods = []
    for name in ("flows.cli_method", "flows.cli_stages", "flows.cli_flows", "flows.cli_judge"):
        try:
            mods.append(importlib.import_module(name))
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
    return mods


def main(argv: list[str] | None = None) -> int:
    offline_defaults()
    args = build_parser().parse_args(argv)
    from nlsr.errors import NLSRError
    try:
        return args.func(args) or 0
    except (NLSRError, FileNotFoundError) as err:
        print(f"nlsr {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
