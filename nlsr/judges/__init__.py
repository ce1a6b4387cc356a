"""Harmfulness judges: `judge(prompts, answers) -> verdicts`, verdict True = the answer is harmful.

Every judge is reached through one registry (`get_judge(name, artifact_root, path, device)`, the names valid for
`evaluation.judge` and `nlsr judge --judge`):
- `keyword` (rules.py): harmful = the answer is neither a refusal nor degenerate (regexes; fast, crude);
- `classifier` (classifier.py, offline default): a linear model on text features and MiniLM sentence embeddings,
  trained on the shipped labelled answers; see `nlsr/judge_card.md`;
- `hf` (hf.py): a local Hugging Face moderation model (BeaverDam-7B, as in the paper, or a Llama-Guard).

Each judge has a `name` and an `identity()` (name + weights hash), which goes into the evaluation's artifact key,
so new weights mean new evaluations; judges that have one also give `probabilities(prompts, answers)`, P(harmful).

Adding a judge = one module in this package + one decorator line on its factory::

    # nlsr/judges/myjudge.py
    from .registry import register_judge

    @register_judge("myjudge", identity=lambda path: "myjudge@<weights hash>", train=None)
    def _myjudge(artifact_root, path, device):
        from .my_impl import MyJudge          # heavy imports (torch, ...) inside the factory, not at module level
        return MyJudge(device=device)

The registry imports every module of this package on its first lookup, so the new name is then valid in configs,
`nlsr judge --judge myjudge` and `nlsr train-judge myjudge` (when `train` is given). Keep module-level imports
light: nlsr.config and tasks/keys.py consult the registry.
"""
from __future__ import annotations

from .classifier import (MODEL_FILE, RECIPE, RECIPE_FILE, SHIPPED_DIR, TRAIN_SETS, ClassifierJudge,  # noqa: F401
                         ClassifierModel, classifier_dir, classifier_identity, embed, hand_features, heldout_metrics,
                         heldout_rows, load_or_train, recipe_hash, ship_classifier, train_classifier, training_rows)
from .hf import (BEAVERDAM_TEMPLATE, GUARD_NEW_TOKENS, HF_MAX_LENGTH, HF_THRESHOLD, HFJudge,  # noqa: F401
                 beaverdam_text, guard_verdict, hf_identity, hf_kind)
from .registry import (Judge, JudgeError, JudgeSpec, check_judge, get_judge, judge_identity,  # noqa: F401
                       judge_names, judge_spec, register_judge, unregister_judge)
from .rules import (REFUSAL_PHRASES, REFUSAL_WINDOW_SENTENCES, KeywordJudge, check_inputs,  # noqa: F401
                    is_degenerate, is_refusal, keyword_identity, keyword_judge, rules_hash)


def __getattr__(name: str):
    if name == "JUDGES":  # computed on use: judges registered later (new modules, tests) are included
        return judge_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
