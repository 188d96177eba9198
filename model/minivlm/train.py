"""Train MiniVLM: the projector, and optionally low-rank deltas of the LM's linears (the DINOv2 tower is frozen).

Training data are SynthBench-style scenes drawn with seeds of their own (never the evaluation or calibration
seeds): reading, colour / shape / count / position questions and yes/no questions, answered with one word.
The loss is the LM's cross-entropy on the answer tokens. The tower's features (the ``--layers`` hidden states,
concatenated) are computed once per image, in fp32, and cached. Checkpoints go to the cache every few minutes,
so an interrupted run resumes. At the end the model is scored on the SynthBench *calibration* files (teacher-
forced: an answer counts when every answer token is the argmax), the measurement that picks between settings;
the evaluation files are never read here.

    python -m model.minivlm.train [--minutes 45] [--layers -1] [--lora_rank 0] [--bf16 auto] [--mix 1,1,1] ...

Writes ``model/minivlm/trained.safetensors`` and ``model/minivlm/train_log.json``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import time

import torch
from torch import nn

from evaluation import datasets, synthbench
from evaluation.eval import VQA_SUFFIX, dataset_prompt
from evaluation.scorers import parse_answers

from .build import DELTA_PREFIX, PROJECTOR_PREFIX, TRAINED_FILE, build, read_trained
from .convert import default_cache

TRAIN_SEED_BASE = 100_000  # far from synthbench.EVAL_SEED / CALIB_SEED
LOG_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_log.json")
DELTA_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def training_samples(n: int, seed: int, mix: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> list[dict]:
    """``n`` (image, question, answer) triples from training-only seeds; ``mix`` weighs reading, VQA and
    yes/no questions (equal thirds by default)."""
    total = sum(mix)
    n_ocr, n_vqa = round(n * mix[0] / total), round(n * mix[1] / total)
    n_yn = n - n_ocr - n_vqa
    base = TRAIN_SEED_BASE + seed
    out = []
    for r in synthbench.ocr_rows(n_ocr, base):
        out.append({"image": r["image"], "question": r["question"] + VQA_SUFFIX, "answer": r["answer"][0]})
    for r in synthbench.vqa_rows(n_vqa, base + 1):
        out.append({"image": r["image"], "question": r["question"] + VQA_SUFFIX, "answer": r["answer"][0]})
    for r in synthbench.yn_rows(n_yn // 2 + 1, base + 2):
        out.append({"image": r["image"], "question": r["question"], "answer": r["answer"]})
    random.Random(seed).shuffle(out)
    return out[:n]


def calibration_samples() -> dict[str, list[dict]]:
    """The SynthBench calibration files' rows, prompted as the evaluation prompts them, per subset."""
    out = {}
    for s in synthbench.SUBSETS:
        rows = datasets.load_rows(synthbench.DATA_DIR, f"{s}_calib")
        out[s] = [{"image": datasets.image_of(r, synthbench.DATA_DIR), "question": dataset_prompt(s, r),
                   "answer": parse_answers(r["answer"])[0]} for r in rows]
    return out


def encode(processor, sample: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of prompt + answer and the labels (-100 except the answer and its end token)."""
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample["question"]}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    p_ids = processor(text=[prompt], images=[sample["image"]], return_tensors="pt")["input_ids"][0]
    a_ids = processor.tokenizer(sample["answer"] + "<|im_end|>", add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    ids = torch.cat([p_ids, a_ids])
    labels = torch.full_like(ids, -100)
    labels[len(p_ids):] = a_ids
    return ids, labels


@torch.no_grad()
def tower_features(model, processor, images, layers: int | list[int], batch: int = 32) -> torch.Tensor:
    """What the projector reads: the ``layers`` hidden states without the class token, concatenated (fp32)."""
    layers = [layers] if isinstance(layers, int) else list(layers)
    out = []
    for i in range(0, len(images), batch):
        pix = processor.image_processor(images=images[i:i + batch], return_tensors="pt")["pixel_values"]
        hs = model.model.vision_tower(pixel_values=pix.float(), output_hidden_states=True).hidden_states
        out.append(torch.cat([hs[j][:, 1:] for j in layers], dim=-1))
    return torch.cat(out)


class LowRankDelta(nn.Module):
    """``base(x) + scale * x A^T B^T`` with B starting at zero (training only; build() merges B A into W)."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, generator: torch.Generator) -> None:
        super().__init__()
        self.base, self.scale = base, scale
        self.A = nn.Parameter(torch.randn(rank, base.in_features, generator=generator) / math.sqrt(base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * ((x @ self.A.t().to(x.dtype)) @ self.B.t().to(x.dtype))


def add_deltas(lm: nn.Module, rank: int, scale: float, seed: int) -> dict[str, LowRankDelta]:
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for i, layer in enumerate(lm.layers):
        for t in DELTA_TARGETS:
            parent_path, _, leaf = t.rpartition(".")
            parent = layer.get_submodule(parent_path)
            d = LowRankDelta(getattr(parent, leaf), rank, scale, g)
            setattr(parent, leaf, d)
            deltas[f"layers.{i}.{t}"] = d
    return deltas


def loss_on(model, feats, ids_list, labels_list, image_token_id: int, reduce: bool = True) -> torch.Tensor:
    """Cross-entropy of the answer tokens, logits computed only where labels exist. ``reduce=False``: per sample,
    whether every answer token is the argmax (teacher-forced exact match)."""
    n = max(len(x) for x in ids_list)
    ids = torch.zeros((len(ids_list), n), dtype=torch.long)
    labels = torch.full((len(ids_list), n), -100, dtype=torch.long)
    mask = torch.zeros((len(ids_list), n), dtype=torch.long)
    for i, (x, y) in enumerate(zip(ids_list, labels_list)):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = x, y, 1
    lm = model.model.language_model
    emb = lm.embed_tokens(ids)
    img = model.model.multi_modal_projector(feats)  # [B, 64, hidden]
    is_img = ids == image_token_id
    emb = emb.masked_scatter(is_img[..., None], img.reshape(-1, img.shape[-1]).to(emb.dtype))
    hidden = lm(inputs_embeds=emb, attention_mask=mask, use_cache=False).last_hidden_state
    h, y = hidden[:, :-1], labels[:, 1:]  # position t predicts token t+1
    sel = y != -100
    logits = model.lm_head(h[sel])
    if reduce:
        return nn.functional.cross_entropy(logits.float(), y[sel])
    hit = torch.ones_like(y, dtype=torch.bool)
    hit[sel] = logits.argmax(-1) == y[sel]
    return hit.all(dim=1)


@torch.no_grad()
def calibration_accuracy(model, processor, layers, image_token_id: int, autocast: bool) -> dict[str, float]:
    """Teacher-forced exact match (percent) per SynthBench calibration subset."""
    out = {}
    for subset, rows in calibration_samples().items():
        enc = [encode(processor, r) for r in rows]
        feats = tower_features(model, processor, [r["image"] for r in rows], layers)
        hits = []
        for i in range(0, len(rows), 16):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                hits.append(loss_on(model, feats[i:i + 16], [e[0] for e in enc[i:i + 16]], [e[1] for e in enc[i:i + 16]],
                                    image_token_id, reduce=False))
        out[subset] = round(100.0 * float(torch.cat(hits).float().mean()), 1)
    return out


def cached_features(model, processor, samples, layers, key: str, cache: str) -> torch.Tensor:
    path = os.path.join(cache, f"train_features_{key}.pt")
    if os.path.isfile(path):
        return torch.load(path)
    feats = tower_features(model, processor, [s["image"] for s in samples], layers)
    torch.save(feats, path)
    return feats


def _bf16_default() -> bool:
    from fake_quant.cpu_isa import detect

    isa = detect()
    return isa.amx or isa.avx512_bf16


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=default_cache())
    ap.add_argument("--minutes", type=float, default=45.0, help="training time budget (scene drawing excluded)")
    ap.add_argument("--samples", type=int, default=6000, help="training scenes drawn (features computed once)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3, help="projector learning rate")
    ap.add_argument("--layers", default="-1", help="tower hidden states the projector reads, e.g. -1 or 4,8,12")
    ap.add_argument("--lora_rank", type=int, default=0, help="rank of the LM's trained deltas (0: LM frozen)")
    ap.add_argument("--lora_lr", type=float, default=3e-4)
    ap.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                    help="bf16 autocast for the LM's forward/backward (auto: where the CPU has a bf16 unit)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=TRAINED_FILE)
    ap.add_argument("--log", default=LOG_FILE)
    ap.add_argument("--init", default=None, help="continue from this trained file (same layers and rank)")
    ap.add_argument("--mix", default="1,1,1", help="weights of reading, VQA and yes/no scenes in the training set")
    args = ap.parse_args(argv)
    mix = tuple(float(v) for v in args.mix.split(","))
    if len(mix) != 3 or min(mix) < 0 or sum(mix) <= 0:
        raise SystemExit(f"--mix {args.mix!r}: give three non-negative weights, e.g. 2,1,2")
    try:
        layers = [int(v) for v in args.layers.split(",")]
    except ValueError:
        raise SystemExit(f"--layers {args.layers!r}: give tower layer indices, e.g. -1 or 4,8,12") from None
    layers = layers[0] if len(layers) == 1 else layers
    if args.lora_rank < 0:
        raise SystemExit(f"--lora_rank must be 0 or more, got {args.lora_rank}")
    previous, init = None, None
    if args.init is not None:
        if not os.path.isfile(args.init):
            raise SystemExit(f"--init {args.init}: no such file")
        init, init_meta = read_trained(args.init)
        if init_meta["vision_feature_layer"] != layers:
            raise SystemExit(f"--init {args.init} reads layers {init_meta['vision_feature_layer']}, not --layers {args.layers}")
        prev_log = os.path.join(os.path.dirname(os.path.abspath(args.init)), "train_log.json")
        if os.path.isfile(prev_log):
            with open(prev_log) as f:
                previous = json.load(f)
    autocast = _bf16_default() if args.bf16 == "auto" else args.bf16 == "on"
    torch.manual_seed(args.seed)
    model, processor = build(args.cache, trained=None, seed=args.seed, feature_layers=layers)
    for p in model.parameters():
        p.requires_grad_(False)
    proj = model.model.multi_modal_projector
    scale = 2.0  # alpha / rank with alpha = 2 * rank
    deltas = add_deltas(model.model.language_model, args.lora_rank, scale, args.seed) if args.lora_rank else {}
    if init is not None:
        proj.load_state_dict({k[len(PROJECTOR_PREFIX):]: v for k, v in init.items() if k.startswith(PROJECTOR_PREFIX)})
        with torch.no_grad():
            for name, d in deltas.items():
                if f"{DELTA_PREFIX}{name}.A" not in init:
                    raise SystemExit(f"--init {args.init} has no LM delta for {name} (trained with another --lora_rank?)")
                d.A.copy_(init[f"{DELTA_PREFIX}{name}.A"])
                d.B.copy_(init[f"{DELTA_PREFIX}{name}.B"])
    for p in proj.parameters():
        p.requires_grad_(True)
    image_token_id = model.config.image_token_id

    t0 = time.perf_counter()
    samples = training_samples(args.samples, args.seed, mix)
    encoded = [encode(processor, s) for s in samples]
    key = hashlib.sha256(json.dumps([args.samples, args.seed, list(mix), layers, TRAIN_SEED_BASE]).encode()).hexdigest()[:12]
    feats = cached_features(model, processor, samples, layers, key, args.cache)
    prep = time.perf_counter() - t0
    print(f"{len(samples)} training scenes; tower features {tuple(feats.shape)} in {prep:.0f}s; bf16 autocast {autocast}",
          flush=True)

    groups = [{"params": list(proj.parameters()), "lr": args.lr, "base_lr": args.lr}]
    if deltas:
        groups.append({"params": [p for d in deltas.values() for p in (d.A, d.B)], "lr": args.lora_lr,
                       "base_lr": args.lora_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    tag = hashlib.sha256(json.dumps([vars(args)[k] for k in ("samples", "batch", "lr", "layers", "lora_rank", "lora_lr",
                                                             "seed", "init", "mix", "minutes")]).encode()).hexdigest()[:12]
    ckpt = os.path.join(args.cache, f"train_ckpt_{tag}.pt")
    trainable = {"projector": proj, **{f"delta.{k}": v for k, v in deltas.items()}}
    step, history = 0, []
    if os.path.isfile(ckpt):
        state = torch.load(ckpt)
        for k, m in trainable.items():
            m.load_state_dict(state["modules"][k], strict=False)
        opt.load_state_dict(state["optimizer"])
        step, history = state["step"], state["history"]
        print(f"resumed at step {step}", flush=True)
    rng = random.Random(args.seed + step)
    budget = args.minutes * 60
    t_start, t_ckpt = time.perf_counter(), time.perf_counter()
    spent_before = history[-1]["seconds"] if history else 0.0
    model.train()
    while spent_before + (time.perf_counter() - t_start) < budget:
        idx = rng.sample(range(len(samples)), args.batch)
        frac = min(1.0, (spent_before + time.perf_counter() - t_start) / budget)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))  # cosine to 10%
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_on(model, feats[idx], [encoded[i][0] for i in idx], [encoded[i][1] for i in idx], image_token_id)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 10 == 0:
            history.append({"step": step, "loss": float(loss.detach()), "seconds": spent_before + time.perf_counter() - t_start})
            print(f"step {step} loss {float(loss.detach()):.4f} ({history[-1]['seconds']:.0f}s)", flush=True)
        if time.perf_counter() - t_ckpt > 300:
            torch.save({"modules": {k: m.state_dict() for k, m in trainable.items()}, "optimizer": opt.state_dict(),
                        "step": step, "history": history}, ckpt)
            t_ckpt = time.perf_counter()
    model.eval()
    t_eval = time.perf_counter()
    calib = calibration_accuracy(model, processor, layers, image_token_id, autocast)
    print(f"calibration files, teacher-forced exact match: {calib} ({time.perf_counter() - t_eval:.0f}s)", flush=True)
    from safetensors.torch import save_file

    tensors = {f"{PROJECTOR_PREFIX}{k}": v.detach().contiguous() for k, v in proj.state_dict().items()}
    for name, d in deltas.items():
        tensors[f"{DELTA_PREFIX}{name}.A"] = d.A.detach().contiguous()
        tensors[f"{DELTA_PREFIX}{name}.B"] = d.B.detach().contiguous()
    save_file(tensors, args.out, metadata={"vision_feature_layer": json.dumps(layers), "delta_scale": str(scale),
                                           "lora_rank": str(args.lora_rank)})
    summary = {"steps": step, "batch": args.batch, "lr": args.lr, "layers": layers, "lora_rank": args.lora_rank,
               "lora_lr": args.lora_lr if deltas else None, "bf16_autocast": autocast, "seed": args.seed,
               "training_scenes": len(samples), "train_seed_base": TRAIN_SEED_BASE, "minutes": args.minutes,
               "first_loss": history[0]["loss"] if history else None,
               "final_loss": history[-1]["loss"] if history else None,
               "calibration_teacher_forced": calib, "loss_every_10_steps": [h["loss"] for h in history],
               "mix_reading_vqa_yn": list(mix), "init": None if args.init is None else os.path.basename(args.init),
               "previous_phase": previous}
    with open(args.log, "w") as f:
        json.dump(summary, f, indent=1)
    if os.path.isfile(ckpt):
        os.remove(ckpt)
    print(f"saved {args.out}; {step} steps, loss {summary['first_loss']} -> {summary['final_loss']}")
    return summary


if __name__ == "__main__":
    main()
