"""Train MiniVLM's projector (the only trained part: the DINOv2 tower and SmolLM2 stay frozen and untouched).

Training data are SynthBench-style scenes drawn with seeds of their own (never the evaluation or calibration
seeds): reading, colour / shape / count / position questions and yes/no questions, answered with one word.
The loss is the LM's cross-entropy on the answer tokens. The tower's features are computed once per image.
Checkpoints go to the cache every few minutes, so an interrupted run resumes.

    python -m model.minivlm.train [--minutes 45] [--batch 16] [--lr 1e-3] [--mix 1,1,1] [--init FILE] [--seed 0]

Writes ``model/minivlm/projector.safetensors`` and ``model/minivlm/train_log.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import time

import torch
from torch import nn

from evaluation import synthbench
from evaluation.eval import VQA_SUFFIX

from .build import PROJECTOR_FILE, build
from .convert import default_cache

TRAIN_SEED_BASE = 100_000  # far from synthbench.EVAL_SEED / CALIB_SEED
LOG_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_log.json")


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
def tower_features(model, processor, images, batch: int = 32) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch):
        pix = processor.image_processor(images=images[i:i + batch], return_tensors="pt")["pixel_values"]
        hs = model.model.vision_tower(pixel_values=pix, output_hidden_states=True).hidden_states[-1]
        out.append(hs[:, 1:])  # LLaVA's "default" strategy drops the class token
    return torch.cat(out)


def loss_on(model, feats, ids_list, labels_list, image_token_id: int) -> torch.Tensor:
    """Cross-entropy of the answer tokens, logits computed only where labels exist."""
    n = max(len(x) for x in ids_list)
    pad = 0
    ids = torch.full((len(ids_list), n), pad, dtype=torch.long)
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
    # position t predicts token t+1
    h, y = hidden[:, :-1], labels[:, 1:]
    sel = y != -100
    logits = model.lm_head(h[sel])
    return nn.functional.cross_entropy(logits.float(), y[sel])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=default_cache())
    ap.add_argument("--minutes", type=float, default=45.0, help="training time budget")
    ap.add_argument("--samples", type=int, default=6000, help="training scenes drawn (features computed once)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=PROJECTOR_FILE)
    ap.add_argument("--init", default=None, help="start from this projector (safetensors) instead of a fresh one")
    ap.add_argument("--mix", default="1,1,1", help="weights of reading, VQA and yes/no scenes in the training set")
    args = ap.parse_args(argv)
    mix = tuple(float(v) for v in args.mix.split(","))
    if len(mix) != 3 or min(mix) < 0 or sum(mix) <= 0:
        raise SystemExit(f"--mix {args.mix!r}: give three non-negative weights, e.g. 2,1,2")
    previous = None
    if args.init is not None:
        if not os.path.isfile(args.init):
            raise SystemExit(f"--init {args.init}: no such file")
        prev_log = os.path.join(os.path.dirname(os.path.abspath(args.init)), "train_log.json")
        if os.path.isfile(prev_log):
            with open(prev_log) as f:
                previous = json.load(f)
    torch.manual_seed(args.seed)
    model, processor = build(args.cache, projector=args.init, seed=args.seed)
    for p in model.parameters():
        p.requires_grad_(False)
    proj = model.model.multi_modal_projector
    for p in proj.parameters():
        p.requires_grad_(True)
    image_token_id = model.config.image_token_id

    t0 = time.perf_counter()
    samples = training_samples(args.samples, args.seed, mix)
    encoded = [encode(processor, s) for s in samples]
    feats = tower_features(model, processor, [s["image"] for s in samples])
    prep = time.perf_counter() - t0
    print(f"{len(samples)} training scenes; tower features {tuple(feats.shape)} in {prep:.0f}s", flush=True)

    opt = torch.optim.AdamW(proj.parameters(), lr=args.lr, weight_decay=0.0)
    ckpt = os.path.join(args.cache, f"projector_ckpt_seed{args.seed}{'_init' if args.init else ''}.pt")
    step, history = 0, []
    if os.path.isfile(ckpt):
        state = torch.load(ckpt)
        proj.load_state_dict(state["projector"])
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
            g["lr"] = args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))  # cosine to 10%
        loss = loss_on(model, feats[idx], [encoded[i][0] for i in idx], [encoded[i][1] for i in idx], image_token_id)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 10 == 0:
            history.append({"step": step, "loss": float(loss.detach()), "seconds": spent_before + time.perf_counter() - t_start})
            print(f"step {step} loss {float(loss.detach()):.4f} ({history[-1]['seconds']:.0f}s)", flush=True)
        if time.perf_counter() - t_ckpt > 300:
            torch.save({"projector": proj.state_dict(), "optimizer": opt.state_dict(), "step": step, "history": history}, ckpt)
            t_ckpt = time.perf_counter()
    model.eval()
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in proj.state_dict().items()}, args.out)
    summary = {"steps": step, "batch": args.batch, "lr": args.lr, "seed": args.seed, "training_scenes": len(samples),
               "train_seed_base": TRAIN_SEED_BASE, "minutes": args.minutes, "first_loss": history[0]["loss"] if history else None,
               "final_loss": history[-1]["loss"] if history else None, "loss_every_10_steps": [h["loss"] for h in history],
               "mix_reading_vqa_yn": list(mix), "init": None if args.init is None else os.path.basename(args.init),
               "previous_phase": previous}
    with open(LOG_FILE, "w") as f:
        json.dump(summary, f, indent=1)
    if os.path.isfile(ckpt):
        os.remove(ckpt)
    print(f"saved {args.out}; {step} steps, loss {summary['first_loss']} -> {summary['final_loss']}")
    return summary


if __name__ == "__main__":
    main()
