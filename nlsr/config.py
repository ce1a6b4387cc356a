"""Typed experiment configuration: one pydantic model per stage, YAML loading, dotted overrides, stable hashes.

Every model forbids unknown keys, so a typo in a YAML file or a `--set` override fails with the field's path.
"""
from __future__ import annotations

from .errors import NLSRError

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .defenses.config import DefensesConfig
from .methods import ALIGNMENT, ALIGNMENT_DEFENSES, FINETUNE_DEFENSES, REALIGNERS, SCORERS

TARGETS_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TASKS = ("sst2", "agnews", "gsm8k")
DEVICE_PATTERN = r"auto|cpu|mps|(cuda|xpu)(:\d+)?"


class ConfigError(NLSRError):
    """A configuration file or override is invalid; the message names the field or file."""


# Method names are checked against their registry (nlsr.methods) at validation time, so a method registered by a
# plugin is a valid choice and an unknown name fails with the list of valid ones.
AlignmentName = Annotated[str, AfterValidator(ALIGNMENT.check)]
AlignmentDefenseName = Annotated[str, AfterValidator(ALIGNMENT_DEFENSES.check)]
FinetuneDefenseName = Annotated[str, AfterValidator(FINETUNE_DEFENSES.check)]
ScorerName = Annotated[str, AfterValidator(SCORERS.check)]
RealignerName = Annotated[str, AfterValidator(REALIGNERS.check)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TinyModel(Strict):
    """A tiny random-initialised Llama for tests (seconds on CPU)."""
    hidden_size: int = Field(64, ge=8)
    intermediate_size: int = Field(128, ge=8)
    num_hidden_layers: int = Field(2, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    num_key_value_heads: int = Field(2, ge=1)
    vocab_size: int = Field(512, ge=300, description="BPE vocabulary trained on the shipped text")
    seed: int = 0


class ModelConfig(Strict):
    source: Literal["embedded", "local", "tiny"] = "embedded"
    path: str | None = Field(None, description="Hugging Face model folder; required when source is 'local'")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field("auto", description="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps', "
                                            "'xpu:0'")
    tiny: TinyModel = TinyModel()

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        if not re.fullmatch(DEVICE_PATTERN, v):
            raise ValueError("unknown device; expected 'auto', 'cpu', 'cuda', 'cuda:N', 'mps' or 'xpu:N'")
        return v

    @model_validator(mode="after")
    def _path_for_local(self):
        if self.source == "local" and not self.path:
            raise ValueError("model.path is required when model.source is 'local' (a Hugging Face model folder)")
        return self


class LoraConfig(Strict):
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: list(TARGETS_ALL))


class DataConfig(Strict):
    task: Literal["sst2", "agnews", "gsm8k"] = "sst2"
    n: int = Field(1000, ge=1, description="rows in the fine-tuning mix")
    poison_ratio: float = Field(0.05, ge=0.0, le=1.0, description="fraction p of harmful rows")
    poison_source: Literal["beavertails", "pure_bad"] = "beavertails"
    seed: int = 0
    template: Literal["alpaca", "chat"] = "alpaca"


class TrainConfig(Strict):
    """Shared optimisation settings of an SFT-style stage (trl trainer arguments)."""
    learning_rate: float = Field(1e-4, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="-1: use epochs")
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(256, ge=16)
    n_samples: int | None = Field(None, ge=1, description="cap on training rows (None: all)")
    lr_scheduler: str = "cosine"
    warmup_ratio: float = Field(0.0, ge=0.0, le=1.0)
    logging_steps: int = Field(1, ge=1)
    gradient_checkpointing: bool = Field(False, description="recompute activations (saves GPU memory on large "
                                                            "models; costs ~30% time, so off on CPU)")
    padding_free: bool = Field(
        False, description="feed each batch as one sequence of its rows, without padding, each row attended on its "
                           "own (nlsr.packing): the same loss on fewer token positions where row lengths vary. SFT "
                           "stages use trl's padding-free collator; the preference trainers' padded batches are "
                           "packed as they enter the decoder. Defenses with their own trainer (lisa, "
                           "constrained-sft, vaccine) read the padding mask and always pad")


class SupervisedConfig(TrainConfig):
    """An SFT-style stage (safety SFT, fine-tuning, RESTA's unaligning): trl's SFTTrainer on prompt-completion rows."""


class PreferenceConfig(TrainConfig):
    learning_rate: float = 2e-6
    beta: float = Field(0.1, gt=0, description="DPO/KTO beta, ORPO lambda, SimPO beta")
    simpo_gamma: float = Field(1.0, ge=0, description="SimPO target reward margin (gamma)")


class AlignmentConfig(Strict):
    sft: SupervisedConfig = SupervisedConfig()
    method: AlignmentName = Field("dpo", description="a name in nlsr.methods.ALIGNMENT")
    preference: PreferenceConfig = PreferenceConfig()
    harmless_mix: float = Field(0.0, ge=0.0, le=1.0,
                                description="fraction of harmless task rows mixed into safety SFT, so the model "
                                            "does not learn to refuse everything")
    safety_answers: Literal["all", "refusals"] = Field(
        "all", description="which safe answers align the model (safety SFT and the preference pairs): 'all' "
                           "(the paper: BeaverTails' safe answers, PKU-SafeRLHF's chosen ones), or 'refusals' (only "
                           "those that decline, by nlsr.judges.rules.is_refusal; pairs also need a rejected answer "
                           "that does not): a small model taught by advice-style answers learns to answer, not to "
                           "decline")
    defenses: list[AlignmentDefenseName] = Field(
        default_factory=list, description="alignment-stage defenses evaluated beside the undefended alignment, each "
                                          "its own aligned adapter (from W0) that the undefended fine-tuning then "
                                          "continues (names in nlsr.methods.ALIGNMENT_DEFENSES: vaccine)")

    @model_validator(mode="after")
    def _defended_methods(self):
        """An alignment-stage defense changes some alignment methods' trainers only (Vaccine: DPO's)."""
        for d in self.defenses:
            methods = ALIGNMENT_DEFENSES.meta(d).get("methods")
            if methods is not None and self.method not in methods:
                raise ValueError(f"alignment.defenses: {d!r} needs alignment.method in {list(methods)}, got "
                                 f"{self.method!r}")
        return self

    def answer_filter(self) -> Callable[[str], bool] | None:
        """The safe-answer filter `safety_answers` asks for: None (every answer) or the refusal test."""
        if self.safety_answers == "all":
            return None
        from .judges.rules import is_refusal  # the same phrases that make an answer "safe" for the offline judges
        return is_refusal


class FinetuneConfig(SupervisedConfig):
    learning_rate: float = 1e-4
    aligned: bool = Field(True, description="continue the aligned adapter (paper); False: fresh LoRA on the raw "
                                            "base ('Non-Aligned' baseline)")
    defenses: list[FinetuneDefenseName] = Field(
        default_factory=list, description="fine-tuning-stage defenses evaluated beside the undefended fine-tuning, "
                                          "each its own fine-tuned adapter (names in nlsr.methods.FINETUNE_DEFENSES)")

    def plain(self) -> dict:
        """The settings plain fine-tuning (ATTACK) reads: without the defenses' own sections, so a sweep over a
        defense's knob does not redo the undefended fine-tuning."""
        own = {"defenses", *(s for d in FINETUNE_DEFENSES.names() for s in FINETUNE_DEFENSES.meta(d).get(
            "settings", ()))}
        return self.model_dump(exclude=own)

    def settings(self, defense: str) -> dict:
        """The plain settings plus those `defense` reads."""
        names = FINETUNE_DEFENSES.meta(defense).get("settings", ())
        return {**self.plain(), "defense": defense, **self.model_dump(include=set(names))}


class ReferenceConfig(Strict):
    beta: float = Field(0.9, ge=0.0, description="pre-amplification coefficient")
    mode: Literal["paper", "code"] = Field(
        "paper", description="paper: ΔW_e = (1+β)ΔW_a (B scaled); code: both factors × 2β (release behaviour)")


class ScoringConfig(Strict):
    method: ScorerName = Field("lowrank", description="a name in nlsr.methods.SCORERS")
    sparsity: float = Field(0.8, ge=0.0, lt=1.0, description="P_SR: the mask keeps the top (1 - sparsity)")
    rank_rule: Literal["code", "paper"] = Field(
        "code", description="retained rank q: code int(r·P_SR); paper int(r·(1-P_SR))")
    granularity: Literal["global", "row"] = Field("global", description="magnitude threshold per matrix or per row")
    calibration: Literal["safe", "reference"] = Field(
        "safe", description="safe: shipped safe answers to risky prompts; reference: the safety reference model's "
                            "own greedy answers that the evaluation judge finds safe (the release's way)")
    calibration_format: Literal["paper", "code"] = Field(
        "paper", description="paper: '### Response:\\n' then the whole response; code: the release's formatting, "
                             "no newline after '### Response:' and the response's first token dropped")
    n_samples: int = Field(64, ge=1)
    max_length: int = Field(256, ge=16)
    seed: int = 42
    calibration_pool: int | None = Field(
        None, ge=1, description="reference: prompts answered before the judge filters them (None: 2 × n_samples)")
    calibration_max_new_tokens: int = Field(128, ge=1, description="reference: answer budget (the release: 512)")

    @model_validator(mode="after")
    def _pool(self):
        if self.calibration_pool is not None and self.calibration_pool < self.n_samples:
            raise ValueError(f"scoring.calibration_pool ({self.calibration_pool}) must be at least "
                             f"scoring.n_samples ({self.n_samples})")
        return self

    def pool_size(self) -> int:
        return self.calibration_pool or 2 * self.n_samples


class AntidoteConfig(Strict):
    """Antidote (Huang et al., ICML 2025; defenses-spec §6): one-shot Wanda pruning of the fine-tuned adapter's
    LoRA factors, scored on harmful calibration rows (prompt + harmful answer, every token counts)."""
    density: float = Field(0.1, ge=0.0, le=1.0,
                           description="the release's dense_ratio: the share of each factor row PRUNED (its "
                                       "highest-scoring entries); 0 leaves the adapter unchanged")
    calibration: Literal["pure_bad", "harmful_dev"] = Field(
        "pure_bad", description="harmful rows to score on: pure_bad (111 rows, default: harmful_dev is the set "
                                "knobs are chosen on) or harmful_dev (BeaverTails unsafe, the spec's first choice)")
    n_samples: int = Field(128, ge=1, description="calibration rows (all of them when the set is smaller)")
    max_length: int = Field(160, ge=16, description="tokens per calibration row (prompt + answer + EOS)")


class RestaConfig(Strict):
    """RESTA (Bhardwaj et al., ACL 2024; defenses-spec §7): θ = θ_sft + γ(θ_aligned − θ_unaligned), in LoRA deltas,
    with optional DARE on the task delta τ = ΔW_t − ΔW_a."""
    gamma: float = Field(1.0, ge=0.0, description="γ, the weight of the safety vector")
    dare_rate: float = Field(0.0, ge=0.0, lt=1.0, description="DARE drop rate q on the task delta (0: no DARE, "
                                                              "output stays an exact LoRA of rank 3r)")
    dare_seed: int = Field(42, description="seed of the DARE drop masks")


class UnalignConfig(SupervisedConfig):
    """RESTA's unaligned model θ_u: the aligned adapter continued on harmful-only rows (stage 'unalign')."""
    learning_rate: float = 2e-4
    epochs: float = 2.0
    max_length: int = 160
    source: Literal["pure_bad", "beavertails"] = Field(
        "pure_bad", description="harmful rows (must differ from data.poison_source: disjoint from the mix)")


class RealignConfig(Strict):
    method: RealignerName = Field("nlsr", description="the main realigner (variant 'realigned'); a name in "
                                                      "nlsr.methods.REALIGNERS")
    layer_rate: float = Field(0.5, ge=0.0, le=1.0, description="P_L, the base layer pruning probability")
    epsilon: float = Field(0.2, ge=0.0, le=0.5)
    seed: int = 42
    direction: Literal["paper", "code"] = Field(
        "paper", description="paper: low-similarity modules most likely patched; code: the release's inversion, "
                             "tie order and float32 Bernoulli draw (bit-identical to the release)")
    safelora_tau: float = Field(0.6, ge=0.0, le=1.0)
    baselines: list[RealignerName] = Field(
        default_factory=lambda: ["safelora"],
        description="further post-fine-tuning defenses, each a variant of the one fine-tuned adapter")
    stack_on: list[FinetuneDefenseName] = Field(
        default_factory=list, description="fine-tuning-stage defenses (in finetune.defenses) whose own fine-tuned "
                                          "adapter the main realigner also realigns: variant '<method>-on-<defense>', "
                                          "e.g. nlsr-on-lisa (NLSR on top of Lisa)")
    antidote: AntidoteConfig = AntidoteConfig()
    resta: RestaConfig = RestaConfig()
    unaligned: UnalignConfig = UnalignConfig()

    def settings(self, method: str) -> dict:
        """The settings `method` reads (its registry entry's `settings`): its artifact key and report hold only
        these, so a sweep over one method's setting (e.g. safelora_tau) does not redo the others."""
        names = REALIGNERS.meta(method).get("settings", ())
        out = self.model_dump(include=set(names))
        if "direction" in out and out["direction"] == "code":
            out["draw"] = "float32"  # the release's draw (a changed output, so a new key), see nlsr.realign
        return out

    def methods(self) -> list[str]:
        """The main method first, then the baselines (without repeating it)."""
        return [self.method] + [b for b in self.baselines if b != self.method]

    @model_validator(mode="after")
    def _range(self):
        lo, hi = self.layer_rate - self.epsilon, self.layer_rate + self.epsilon
        if lo < 0 or hi > 1:
            raise ValueError(f"realign.layer_rate ± realign.epsilon must stay in [0, 1], got [{lo:.3g}, {hi:.3g}]")
        return self


class EvaluationConfig(Strict):
    judge: str = Field("classifier", description="a registered judge (nlsr.judges.judge_names(): classifier, "
                       "keyword, hf, ...); its identity (name + weights hash) is part of the evaluation's key")
    judge_path: str | None = Field(None, description="local model folder for judges that need one (e.g. 'hf')")
    harmful_set: Literal["harmful_eval", "harmful_dev", "advbench", "harmbench"] | str = Field(
        "harmful_eval", description="a shipped prompt set (harmful_eval, harmful_dev, advbench, harmbench) or the path "
                                    "of a JSONL file of your own prompts: one object per line with a 'prompt' string")
    harmful_limit: int = Field(100, ge=1)
    task_limit: int = Field(100, ge=1)
    task_split: Literal["test", "dev"] = Field(
        "test", description="task accuracy on the task's test rows (the reported number) or on its dev rows "
                            "(data.task_dev_set: train rows the cell never trains on), on which sweeps choose knobs")
    max_new_tokens: int = Field(48, ge=1)
    task_max_new_tokens: int | None = Field(
        None, ge=1, description="None: per task (sst2 4, agnews 6, gsm8k 160: a worked solution needs room)")
    batch_size: int = Field(32, ge=1, description="prompts decoded together (length-sorted, left-padded). Speed "
                            "only: 16, 32 and 64 gave the same answers here (benchmarks/evaluation.py); on 2 CPU cores "
                            "32 decodes ~30 % faster than 16, 128 is slower again")
    extra_harmful_sets: list[Literal["advbench", "harmbench"]] = Field(default_factory=list)
    extra_harmful_limit: int | None = Field(
        None, ge=1, description="prompts of each extra_harmful_sets set (their first N); None: harmful_limit")

    @field_validator("judge")
    @classmethod
    def _registered_judge(cls, name: str) -> str:
        # The registry is light (no torch); the judge itself is built only when an evaluation runs.
        from .judges.registry import JudgeError, judge_spec
        try:
            judge_spec(name)
        except JudgeError as err:
            raise ValueError(str(err)) from None
        return name

    @field_validator("harmful_set")
    @classmethod
    def _prompt_set(cls, name: str) -> str:
        from .data import HARMFUL_SETS, DataError, is_prompt_file, user_prompts
        if is_prompt_file(name):
            try:  # read now: a bad file must stop the run before hours of training, not at its evaluation
                user_prompts(name)
            except DataError as err:
                raise ValueError(str(err)) from None
        elif name not in HARMFUL_SETS:
            raise ValueError(f"unknown prompt set {name!r}; expected one of {list(HARMFUL_SETS)} or the path of a "
                             f".jsonl file with a 'prompt' per line")
        return name

    @model_validator(mode="after")
    def _judge_path(self):
        from .judges.registry import JudgeError, check_judge
        try:
            check_judge(self.judge, self.judge_path)
        except JudgeError as err:
            raise ValueError(str(err)) from None
        return self


class TrackingConfig(Strict):
    uri: str | None = Field(None, description="MLflow tracking URI; None: sqlite under the artifact root")
    experiment: str | None = Field(None, description="MLflow experiment; None: 'nlsr/<config name>'")


class ExperimentConfig(Strict):
    name: str = "default"
    seed: int = 0
    artifact_root: str = Field("runs", description="folder of the artifact store (and, by default, mlflow.db)")
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    data: DataConfig = DataConfig()
    alignment: AlignmentConfig = AlignmentConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    reference: ReferenceConfig = ReferenceConfig()
    scoring: ScoringConfig = ScoringConfig()
    realign: RealignConfig = RealignConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    defenses: DefensesConfig = DefensesConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _harmful_sets_disjoint(self):
        """Post-fine-tuning defenses that read harmful rows must not read the poison rows of the mix."""
        methods = self.realign.methods()
        if "antidote" in methods and self.realign.antidote.calibration == self.data.poison_source:
            raise ValueError(f"realign.antidote.calibration ({self.realign.antidote.calibration}) must differ from "
                             f"data.poison_source: the calibration rows must be disjoint from the poison rows")
        if "resta" in methods and self.realign.unaligned.source == self.data.poison_source:
            raise ValueError(f"realign.unaligned.source ({self.realign.unaligned.source}) must differ from "
                             f"data.poison_source: the unaligned model's rows must be disjoint from the mix")
        return self

    @model_validator(mode="after")
    def _stacked_defenses(self):
        """The main realigner can stack only on a defense this cell fine-tunes, on the aligned model's base."""
        for d in self.realign.stack_on:
            if d not in self.finetune.defenses:
                raise ValueError(f"realign.stack_on: {d!r} is not in finetune.defenses {self.finetune.defenses}")
            if FINETUNE_DEFENSES.meta(d).get("inputs", {}).get("base", "wbase") != "wbase":
                raise ValueError(f"realign.stack_on: {d!r} fine-tunes the raw base, not the aligned model; there is "
                                 f"no aligned model to realign it towards")
        return self

    @model_validator(mode="after")
    def _safety_rows_fit(self):
        """Vlguard's guard rows and Lisa's guide rows are the first rows of the safety-SFT pool (only its refusals
        under alignment.safety_answers: refusals): a fraction may not ask for more rows than the pool holds."""
        asks = [(d, FINETUNE_DEFENSES.meta(d)) for d in self.finetune.defenses]
        asks = [(f"defenses.{m['section']}.{m['safety_rows']}", getattr(getattr(self.defenses, m["section"]),
                                                                       m["safety_rows"]))
                for d, m in asks if m.get("safety_rows")]
        if asks:
            from .data import n_poison, safety_sft_set
            refusals = self.alignment.safety_answers == "refusals"
            pool = len(safety_sft_set(refuses=self.alignment.answer_filter()))
            for name, fraction in asks:
                k = n_poison(self.data.n, fraction)
                if k > pool:
                    raise ValueError(f"{name}: {fraction} of data.n {self.data.n} asks for {k} rows of the safety-SFT "
                                     f"pool{' of refusals (alignment.safety_answers)' if refusals else ''}, which "
                                     f"holds {pool}; expected at most {pool / self.data.n:.3f}")
        return self

    @model_validator(mode="after")
    def _task_dev_fits(self):
        """The dev rows must be train rows that neither the fine-tuning mix nor the safety SFT takes."""
        if self.evaluation.task_split == "dev":
            from .data import DataError, task_dev_set
            try:
                task_dev_set(self.data.task, 1, *self.task_train_use())
            except DataError as err:
                raise ValueError(str(err)) from None
        return self

    def task_train_use(self) -> tuple[int, int]:
        """(head, tail): the rows of the task's train file that the fine-tuning mix takes from its start and the
        safety SFT (harmless_mix) from its end."""
        from .data import SAFE_SFT, n_poison
        head = self.data.n - n_poison(self.data.n, self.data.poison_ratio)
        sft_rows = self.alignment.sft.n_samples or SAFE_SFT.stop - SAFE_SFT.start
        return head, n_poison(sft_rows, self.alignment.harmless_mix)

    @field_validator("artifact_root")
    @classmethod
    def _root_not_empty(cls, v: str) -> str:
        if not v.strip():  # "" would put the store, mlflow.db and Prefect's files in the current folder
            raise ValueError("artifact_root is empty; expected a folder such as 'runs'")
        return v


# ----------------------------------------------------------------------------------------------------------
# hashing

def stable_hash(obj: Any, length: int = 16) -> str:
    """sha256 over canonical JSON (sorted keys): equal configs give equal hashes across processes and runs."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def config_hash(cfg: BaseModel) -> str:
    return stable_hash(cfg)


# ----------------------------------------------------------------------------------------------------------
# loading

def parse_override(item: str) -> tuple[list[str], Any]:
    """'realign.epsilon=0.1' -> (['realign', 'epsilon'], 0.1); the value is parsed as YAML (numbers, lists...)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. realign.epsilon=0.1")
    key, raw = item.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {item!r}: empty key")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict, overrides: list[str] | None, model: type[BaseModel] = ExperimentConfig) -> dict:
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides or []:
        path, value = parse_override(item)
        node, cls = data, model
        for i, part in enumerate(path):
            fields = getattr(cls, "model_fields", None)
            if fields is not None and part not in fields:
                where = ".".join(path[:i]) or "the top level"
                raise ConfigError(f"override {item!r}: unknown field {part!r} in {where}; "
                                  f"expected one of {sorted(fields)}")
            ann = fields[part].annotation if fields is not None else None
            cls = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
            if i == len(path) - 1:
                node[part] = value
            else:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"override {item!r}: {'.'.join(path[:i + 1])} is not a section")
    return data


def _format_validation(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {loc}: {e['msg']}" + (f" (got {e['input']!r})" if "input" in e and not isinstance(
            e["input"], dict) else ""))
    return "\n".join(lines)


def validate(data: dict, source: str, model: type[BaseModel] = ExperimentConfig):
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation(err, source)) from None


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if data is None:  # an empty file must not silently run the built-in defaults
        raise ConfigError(f"config file {path} is empty; expected a mapping of settings (see configs/smoke.yaml), "
                          "or no config argument for the built-in defaults")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                model: type[BaseModel] = ExperimentConfig):
    """Load a YAML config (or the defaults when path is None), apply dotted overrides, validate."""
    data = read_yaml(path) if path else {}
    data = apply_overrides(data, overrides, model)
    return validate(data, str(path) if path else "the defaults", model)


def dump_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# ----------------------------------------------------------------------------------------------------------
# grids

class GridChoice(Strict):
    """`choose:` of a sweep grid: its one non-seed axis is a defense's knob, chosen on dev data by nlsr.choice."""
    variant: str = Field(..., description="the variant whose knob the axis sweeps (e.g. antidote, realigned, lisa)")
    tolerance: float = Field(2.0, ge=0.0, description="task-accuracy points the defense may lose against the "
                                                      "undefended fine-tuned model")


class GridConfig(Strict):
    """A grid of cells: a base experiment config, overrides for every cell, and axes (dotted key -> values).

    Example (configs/grids/table1.yaml):
        name: table1-sst2
        base: ../default.yaml            # relative to the grid file
        overrides: [data.task=sst2]
        axes: {data.poison_ratio: [0.01, 0.05, 0.1, 0.2], seed: [0]}
    """
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$")
    base: str = Field(..., description="experiment YAML, relative to the grid file (or absolute)")
    overrides: list[str] = Field(default_factory=list, description="KEY=VALUE applied to every cell")
    axes: dict[str, list[Any]] = Field(default_factory=dict, description="dotted key -> values; the cells are "
                                                                        "the cartesian product")
    choose: GridChoice | None = Field(None, description="a sweep that chooses a knob (nlsr.choice); None: a plain grid")
    compare: dict[str, Any] = Field(default_factory=dict, description="axis -> reference value: the report also "
                                    "tests each other value of that axis against it, same variant, paired on prompts")
    pivot: str | None = Field(None, description="an axis: the report also prints the paper's layout, one column per "
                              "value of that axis in the order of axes.<key> (nlsr.report.pivot)")

    @model_validator(mode="after")
    def _axes_non_empty(self):
        for key, values in self.axes.items():
            if not values:
                raise ValueError(f"axes.{key}: expected a non-empty list of values")
        for key, reference in self.compare.items():
            if reference not in self.axes.get(key, []):
                raise ValueError(f"compare.{key}: expected one of the values of axes.{key} "
                                 f"({self.axes.get(key, 'not an axis')}), got {reference!r}")
        if self.pivot is not None:
            self._check_pivot()
        return self

    def _check_pivot(self) -> None:
        if self.pivot not in self.axes:
            raise ValueError(f"pivot: expected one of the axes ({', '.join(self.axes)}), got {self.pivot!r}")
        others = [k for k, v in self.axes.items() if k != self.pivot and len(v) > 1 and k.split(".")[-1] != "seed"]
        if others:
            raise ValueError(f"pivot: {self.pivot}: the axes {', '.join(others)} vary too; expected the pivot to be "
                             f"the one axis besides seeds")

    def pivots(self) -> dict[str, list]:
        """`pivot` as nlsr.report.write_results takes it: axis -> its values in the grid's order."""
        return {self.pivot: self.axes[self.pivot]} if self.pivot else {}

    def base_path(self, grid_dir: str | Path = ".") -> Path:
        path = Path(self.base).expanduser()
        return path if path.is_absolute() else Path(grid_dir) / path

    def on_base(self, base: str | Path) -> GridConfig:
        """The same grid on another experiment YAML (`nlsr grid --base`), named `<name>-on-<YAML stem>` so that its
        MLflow experiment and results folder stay apart from the grid's own."""
        path = Path(base).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"--base: {base}: expected an experiment YAML file")
        name = f"{self.name}-on-{path.stem}"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ConfigError(f"--base: {base}: expected a file name of letters, digits, '_', '.' or '-'")
        return self.model_copy(update={"base": str(path), "name": name})

    def points(self) -> list[dict[str, Any]]:
        """The grid points, in order: one dict (dotted key -> value) per cell."""
        import itertools
        keys = list(self.axes)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(self.axes[k] for k in keys))]

    def selected(self, only: list[str] | None) -> list[bool]:
        """Which points `nlsr grid --only AXIS=VALUE` runs (one flag per point): those holding every given value.
        Several values of one axis select any of them. A grid too long for one machine or one sitting can so be
        run in parts (one data seed at a time, say), here or on other machines whose rows.jsonl `nlsr report
        --rows` merges."""
        wanted: dict[str, list] = {}
        for item in only or []:
            path, value = parse_override(item)
            key = ".".join(path)
            if key not in self.axes:
                raise ConfigError(f"--only {item}: {key!r} is not an axis of grid {self.name}; expected one of "
                                  f"{sorted(self.axes) or 'none (the grid has no axes)'}")
            if value not in self.axes[key]:
                raise ConfigError(f"--only {item}: expected one of the values of axes.{key} {self.axes[key]}, "
                                  f"got {value!r}")
            wanted.setdefault(key, []).append(value)
        return [all(point[k] in values for k, values in wanted.items()) for point in self.points()]

    def cells(self, grid_dir: str | Path = ".", extra: list[str] | None = None) -> list[ExperimentConfig]:
        """One validated ExperimentConfig per grid point (base + overrides + the point's values + extra)."""
        base = self.base_path(grid_dir)
        out = []
        for point in self.points():
            items = [f"{k}={json.dumps(v)}" for k, v in point.items()]
            try:
                out.append(load_config(base, [*self.overrides, *items, *(extra or [])]))
            except ConfigError as err:
                raise ConfigError(f"grid {self.name}, cell {point}: {err}") from None
        return out


def load_grid(path: str | Path) -> GridConfig:
    return validate(read_yaml(path), str(path), GridConfig)
