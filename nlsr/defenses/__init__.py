"""Harmful-fine-tuning defenses that change a training stage (docs/defenses-spec.md, one module each).

- `non_aligned`: the ATTACK on the raw base with a fresh LoRA (fine-tuning stage);
- `vlguard`: guard rows mixed into the fine-tuning set (fine-tuning stage);
- `lisa`: alternating alignment / fine-tuning steps with a proximal term (fine-tuning stage);
- `constrained_sft`: the token-wise constrained objective against the aligned model (fine-tuning stage);
- `vaccine`: perturbation-aware preference alignment (alignment stage, replaces the aligned adapter).

Their settings live in `config` (section `defenses:` of an experiment). This package imports nothing heavy: each
module loads torch/trl itself.
"""
