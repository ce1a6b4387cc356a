"""EXPERIMENT (not a registered judge): a LoRA classifier on SmolLM2-135M-Instruct reading (prompt, answer) in
the model's own chat format, trained on the run-time train split (+ optionally a balanced BeaverTails/PKU sample)
and measured on the run-time **dev** split after every epoch. The judge card's next step after the MiniLM
cross-encoder tied the shipped classifier (nlsr/judge_card.md); this script says whether a model that reads meaning
does better. Cost: on the shared 2-core CPU (busy with a grid) one training row took ≈ 4 s and one dev answer
≈ 1.2 s, i.e. ≈ 90 min per epoch over 1,334 rows. The CPU-sized variant `"frozen_layers": 22` (LoRA on the top
8 of 30 layers, the lower 22 run once per row and cached) took, on that idle 2-core CPU, 272-382 s to cache 1,334
rows and 313-448 s per epoch. On a 2-core CPU with AVX-512/AMX and `"autocast": true` the full model took 338-405 s
per epoch. Both results are in the judge card ("SmolLM2 + LoRA"). The lent GPU machine
has torch, transformers, peft and scikit-learn but no network, and a call carries at most 64 MiB: the model
(98 MB as the package's Q4_1 GGUF, 270 MB in fp16) has to travel in parts over calls to one warm machine.

Input: "<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>" (prompt ≤ 64 tokens,
answer ≤ 128), read at the final <|im_end|>: the causal model has seen the whole exchange there. LoRA (peft) on
every attention and MLP projection, a linear head on the last layer's state there; weighted BCE with
class-balanced weights (the cross-encoder's loss, `crossencoder_experiment.training_data`), AdamW, linear
warm-up/decay, seed fixed. The threshold and the dev metrics come from `crossencoder_experiment.DevSplit.measure`.

Usage (one JSON recipe override per run; results appended to --out as JSON lines):
  PYTHONPATH=$PWD python scripts/judge_data/lora_experiment.py --base runs/models/smollm2-135m-instruct \\
      '{"tag": "r16_e3", "epochs": 3, "beavertails_per_class": 200, "runtime_weight": 2.0}'
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from crossencoder_experiment import DevSplit, balanced_targets, optimiser, training_data  # noqa: E402

RECIPE = {
    "version": 1,
    "prompt_tokens": 64,
    "answer_tokens": 128,
    "rank": 16,
    "alpha": 32,
    "dropout": 0.05,
    "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "epochs": 3,
    "batch_size": 16,
    "lr": 2e-4,
    "head_lr": 1e-3,
    "weight_decay": 0.01,
    "warmup": 0.1,
    "seed": 0,
    "runtime_weight": 2.0,
    "beavertails_per_class": 200,
    "max_rows": None,          # timing runs: the first N training rows only
    # > 0: the embeddings and layers 0..frozen_layers-1 stay as they are (no LoRA there); their output is computed
    # once per row and cached, and only the layers above (+ the head) are trained. The CPU-sized variant: with 22
    # of 30 layers frozen an epoch costs about a third of the full one.
    "frozen_layers": 0,
    # The state read at the last token is ~46 in norm but varies across answers by only ~1-4 per dimension: the
    # head's gradient (~5) then dwarfs LoRA's (~0.3) and a joint clip starves LoRA (version 1 learnt little: dev AUC
    # 0.69 after 2 of 4 epochs, loss 0.68). "standardize": the head reads the state minus its mean, over its standard
    # deviation (per dimension, from every fifth training row before training; fixed buffers); "clip":
    # "separate" clips LoRA's and the head's gradients each to norm 1.
    "standardize": False,
    "clip": "joint",
    "autocast": False,
}


class LoraJudge:
    """SmolLM2 + LoRA + a linear head read at the last token."""

    def __init__(self, base: str, recipe: dict, device: str = "cpu"):
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModel, AutoTokenizer
        self.recipe = recipe
        self.tok = AutoTokenizer.from_pretrained(base)
        torch.manual_seed(recipe["seed"])
        model = AutoModel.from_pretrained(base, dtype=torch.float32, attn_implementation="sdpa")
        self.frozen = recipe.get("frozen_layers", 0)
        tuned = list(range(self.frozen, model.config.num_hidden_layers))
        cfg = LoraConfig(r=recipe["rank"], lora_alpha=recipe["alpha"], lora_dropout=recipe["dropout"],
                         target_modules=recipe["targets"], layers_to_transform=tuned, layers_pattern="layers")
        self.model = get_peft_model(model, cfg)
        self.core = model        # the LlamaModel, its linear layers now wrapped by peft
        self.head = torch.nn.Linear(model.config.hidden_size, 1)
        self.shift = torch.zeros(model.config.hidden_size)
        self.scale = torch.ones(model.config.hidden_size)
        self.device = torch.device(device)
        self.model.to(self.device)
        self.head.to(self.device)
        self.start = self.tok.convert_tokens_to_ids("<|im_start|>")
        self.end = self.tok.convert_tokens_to_ids("<|im_end|>")

    def encode(self, prompt: str, answer: str) -> list[int]:
        r, t = self.recipe, self.tok
        p = t(prompt, add_special_tokens=False)["input_ids"][:r["prompt_tokens"]]
        a = t(answer, add_special_tokens=False)["input_ids"][:r["answer_tokens"]]
        user = t("user\n", add_special_tokens=False)["input_ids"]
        nl = t("\n", add_special_tokens=False)["input_ids"]
        asst = t("assistant\n", add_special_tokens=False)["input_ids"]
        return [self.start] + user + p + [self.end] + nl + [self.start] + asst + a + [self.end]

    def _layers(self, h, layers):
        """Run decoder layers on right-padded states: causal attention alone keeps each real token from seeing the
        padding after it, so no padding mask is needed (sdpa is causal when the mask is None)."""
        import torch
        pos = torch.arange(h.shape[1], device=h.device)[None]
        pe = self.core.rotary_emb(h, position_ids=pos)
        for layer in layers:
            h = layer(h, attention_mask=None, position_embeddings=pe, position_ids=pos)
        return h

    def rows(self, ids: list[list[int]], batch_size: int = 16) -> list:
        """What `logits` reads per row: the token ids, or with frozen layers their cached output (no grad)."""
        import torch
        if not self.frozen:
            return ids
        out = [None] * len(ids)
        order = np.argsort([len(x) for x in ids], kind="stable")
        with torch.no_grad():
            for lo in range(0, len(ids), batch_size):
                idx = order[lo:lo + batch_size]
                n = max(len(ids[i]) for i in idx)
                x = torch.full((len(idx), n), self.end, dtype=torch.long)
                for r, i in enumerate(idx):
                    x[r, :len(ids[i])] = torch.tensor(ids[i])
                h = self._layers(self.core.embed_tokens(x.to(self.device)), self.core.layers[:self.frozen])
                for r, i in enumerate(idx):
                    out[i] = h[r, :len(ids[i])].clone()
        return out

    def states(self, batch: list):
        """The last layer's (normed) state at each row's final token: what the head reads."""
        import torch
        if self.frozen:
            n = max(len(x) for x in batch)
            h = torch.zeros(len(batch), n, batch[0].shape[-1], device=self.device)
            for i, x in enumerate(batch):
                h[i, :len(x)] = x
            h = self.core.norm(self._layers(h, self.core.layers[self.frozen:]))
            last = torch.tensor([len(x) - 1 for x in batch], device=self.device)
            return h[torch.arange(len(batch)), last]
        n = max(len(x) for x in batch)
        ids = torch.full((len(batch), n), self.end, dtype=torch.long)
        mask = torch.zeros(len(batch), n, dtype=torch.long)
        for i, x in enumerate(batch):
            ids[i, :len(x)] = torch.tensor(x)
            mask[i, :len(x)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        h = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return h[torch.arange(len(batch)), mask.sum(1) - 1]

    def head_input(self, batch: list):
        """`states` in float32. "autocast": the model's products in bfloat16 (fast where the hardware has it: a GPU,
        a CPU with AMX), the head and the loss in float32 (the state varies by ~1-4 per dimension around a norm
        of ~46)."""
        import torch
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bool(self.recipe.get("autocast"))):
            return self.states(batch).float()

    def logits(self, batch: list):
        state = self.head_input(batch)
        return self.head((state - self.shift.to(state.device)) / self.scale.to(state.device)).squeeze(-1)

    def fit_standardizer(self, rows: list, batch_size: int = 32) -> None:
        """shift/scale = per-dimension mean / std of the head's input over `rows`, as the model is now."""
        import torch
        self.model.eval()
        with torch.no_grad():
            states = torch.cat([self.head_input(rows[lo:lo + batch_size]) for lo in range(0, len(rows), batch_size)])
        self.shift, self.scale = states.mean(0), states.std(0).clamp_min(1e-3)

    def probabilities(self, ids: list, batch_size: int = 32) -> np.ndarray:
        import torch
        self.model.eval()
        order = np.argsort([len(x) for x in ids], kind="stable")
        out = np.zeros(len(ids), np.float32)
        with torch.no_grad():
            for lo in range(0, len(ids), batch_size):
                idx = order[lo:lo + batch_size]
                out[idx] = torch.sigmoid(self.logits([ids[i] for i in idx])).float().cpu().numpy()
        return out


def train(judge: LoraJudge, recipe: dict, log=print, on_epoch=None) -> None:
    import torch
    prompts, answers, labels, weights = training_data(recipe)
    if recipe["max_rows"]:
        pick = np.random.default_rng(recipe["seed"]).permutation(len(labels))[:recipe["max_rows"]]
        prompts, answers = [prompts[i] for i in pick], [answers[i] for i in pick]
        labels, weights = [labels[i] for i in pick], [weights[i] for i in pick]
    t0 = time.time()
    ids = judge.rows([judge.encode(p, a) for p, a in zip(prompts, answers)])
    if judge.frozen:
        log(f"layers 0-{judge.frozen - 1} cached for {len(ids)} rows ({time.time() - t0:.0f}s)")
    lora = [p for p in judge.model.parameters() if p.requires_grad]
    opt, sched = optimiser(lora, judge.head.parameters(), recipe, len(ids))
    y, w = balanced_targets(labels, weights, judge.device)
    if recipe.get("standardize"):
        judge.fit_standardizer(ids[::5])   # ~270 rows spread over both sources
    bs = recipe["batch_size"]
    gen = torch.Generator().manual_seed(recipe["seed"])
    for epoch in range(recipe["epochs"]):
        judge.model.train()
        perm = torch.randperm(len(ids), generator=gen).tolist()
        chunks = [sorted(perm[i:i + bs * 8], key=lambda j: len(ids[j])) for i in range(0, len(perm), bs * 8)]
        batches = [c[i:i + bs] for c in chunks for i in range(0, len(c), bs)]
        total, t0 = 0.0, time.time()
        for b in torch.randperm(len(batches), generator=gen).tolist():
            idx = batches[b]
            logits = judge.logits([ids[i] for i in idx])
            idx = torch.tensor(idx, device=judge.device)
            loss = (torch.nn.functional.binary_cross_entropy_with_logits(logits, y[idx], reduction="none")
                    * w[idx]).sum() / w[idx].sum()
            opt.zero_grad()
            loss.backward()
            if recipe.get("clip", "joint") == "separate":
                torch.nn.utils.clip_grad_norm_(lora, 1.0)
                torch.nn.utils.clip_grad_norm_(judge.head.parameters(), 1.0)
            else:
                torch.nn.utils.clip_grad_norm_(lora + list(judge.head.parameters()), 1.0)
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        log(f"epoch {epoch + 1}: loss {total / len(ids):.4f} ({time.time() - t0:.0f}s, {len(ids)} rows)")
        if on_epoch is not None:
            on_epoch(epoch + 1)


def main(argv: list[str]) -> None:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="JSON recipe overrides, each with a 'tag'")
    ap.add_argument("--base", required=True, help="the SmolLM2 folder (<artifact_root>/models/smollm2-135m-instruct)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--out", default="lora_dev.jsonl", help="results, one JSON line per epoch")
    ap.add_argument("--scores", default=None, help="folder: write each epoch's dev probabilities as <tag>-<epoch>.npy")
    args = ap.parse_args(argv)
    dev = DevSplit(128)
    for arg in args.runs:
        over = json.loads(arg)
        tag = over.pop("tag")
        recipe = {**RECIPE, **over}
        judge = LoraJudge(args.base, recipe, args.device)
        dev_ids = judge.rows([judge.encode(p, a) for p, a in zip(dev.prompts, dev.answers)])
        start = time.time()

        def on_epoch(epoch, tag=tag, over=over, start=start, judge=judge, dev_ids=dev_ids):
            t0 = time.time()
            probs = judge.probabilities(dev_ids)
            row = {"tag": tag, "over": over, "epoch": epoch, "seconds": round(time.time() - start),
                   "dev_seconds": round(time.time() - t0), **dev.measure(probs)}
            print(json.dumps(row), flush=True)
            with open(args.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            if args.scores:
                Path(args.scores).mkdir(parents=True, exist_ok=True)
                np.save(Path(args.scores) / f"{tag}-{epoch}.npy", probs)
        train(judge, recipe, log=lambda m: print(m, flush=True), on_epoch=on_epoch)


if __name__ == "__main__":
    main(sys.argv[1:])
