"""Qwen-VL-Chat on our own modelling code: loading the original format, independent references (transformers'
Qwen2 and CLIP encoder layers, torch's MultiheadAttention), rotation invariance with negative controls, AIFS,
and the paper's headline command end to end on the fixtures."""
import copy
import dataclasses
import json
import os

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fake_quant import pipeline
from fake_quant import rotation_utils as ru
from fake_quant.config import QuantConfig
from model import registry
from model.base import Loaded
from model.qwenvl import adapter as qvl_adapter
from model.qwenvl.loading import load
from model.qwenvl.qwen import ntk_alpha
from model.qwenvl.tiny import write_checkpoint
from model.resampler import sincos_2d
from tests import DEVICE, main
from tests.helpers import count_aifs_attention, batches, logits, rel, rotated, stored_tensors

FIX = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_checkpoint(str(tmp_path_factory.mktemp("qvl")), seed=3)


def loaded(path):
    model, proc = load(path, DEVICE, torch.float32)
    return Loaded(model, proc, path)


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def test_checkpoint_in_the_original_format_loads(folder, tmp_path):
    stored = stored_tensors(folder)
    cfg = json.load(open(os.path.join(folder, "config.json")))
    assert cfg["architectures"] == ["QWenLMHeadModel"] and "visual" in cfg
    d, w = cfg["hidden_size"], cfg["visual"]["width"]
    # the original spellings and layouts: packed c_attn with a bias, the ViT's in_proj submodule, the
    # resampler's MultiheadAttention in_proj_weight, proj as a raw [in, out] matrix, no class token
    assert stored["transformer.h.0.attn.c_attn.weight"].shape == (3 * d, d)
    assert "transformer.h.0.attn.c_attn.bias" in stored and "transformer.h.0.attn.c_proj.bias" not in stored
    assert stored["transformer.h.0.mlp.w1.weight"].shape == (cfg["intermediate_size"] // 2, d)
    assert stored["transformer.visual.transformer.resblocks.0.attn.in_proj.weight"].shape == (3 * w, w)
    assert stored["transformer.visual.attn_pool.attn.in_proj_weight"].shape == (3 * d, d)
    assert stored["transformer.visual.positional_embedding"].shape == (256, w)
    assert stored["transformer.visual.proj"].shape == (d, d) and "transformer.visual.conv1.bias" not in stored
    assert not [k for k in stored if "q_proj" in k or "class" in k]
    model = loaded(folder).model
    ours = model.state_dict()
    assert torch.equal(ours["transformer.visual.proj.weight"], stored["transformer.visual.proj"].t())
    assert torch.equal(ours["transformer.visual.attn_pool.attn.k_proj.bias"],
                       stored["transformer.visual.attn_pool.attn.in_proj_bias"][d:2 * d])
    # the same weights as one pytorch_model.bin load to the same model
    binf = write_checkpoint(str(tmp_path / "bin"), seed=3, fmt="bin")
    assert not [f for f in os.listdir(binf) if f.endswith(".safetensors")]
    other = loaded(binf).model.state_dict()
    assert all(torch.equal(other[k], ours[k]) for k in ours)


def test_missing_and_misshaped_tensors_are_named(tmp_path):
    key = "transformer.visual.attn_pool.kv_proj.weight"
    with pytest.raises(ValueError, match=r"lacks 1 tensor\(s\) the model needs: " + key.replace(".", r"\.")):
        load(write_checkpoint(str(tmp_path / "m"), drop=(key,)))
    key = "transformer.h.1.attn.c_attn.weight"
    with pytest.raises(ValueError, match=r"tensor " + key.replace(".", r"\.") + r" has shape \(10, 384\), the config "
                                         r"needs \(1152, 384\)"):
        load(write_checkpoint(str(tmp_path / "s"), reshape={key: (10, 384)}))


def test_bad_folders_get_clear_errors(tmp_path):
    folder = write_checkpoint(str(tmp_path / "c"), shards=1)
    cfg_file = os.path.join(folder, "config.json")
    cfg = json.load(open(cfg_file))
    json.dump({**cfg, "visual": {**cfg["visual"], "image_start_id": 5}}, open(cfg_file, "w"))
    with pytest.raises(ValueError, match="qwen.tiktoken does not belong to these weights"):
        load(folder)
    json.dump({**cfg, "quantization_config": {"quant_method": "gptq", "bits": 4}}, open(cfg_file, "w"))
    with pytest.raises(ValueError, match="already quantized.*floating-point Qwen-VL-Chat"):
        load(folder)
    json.dump({k: v for k, v in cfg.items() if k != "visual"}, open(cfg_file, "w"))
    with pytest.raises(ValueError, match="text-only Qwen checkpoint"):
        load(folder)
    json.dump(cfg, open(cfg_file, "w"))
    os.remove(os.path.join(folder, "qwen.tiktoken"))
    with pytest.raises(FileNotFoundError, match="qwen.tiktoken"):
        load(folder)
    assert registry.for_checkpoint(write_checkpoint(str(tmp_path / "r"), shards=1), "qwenvl").name == "qwenvl"


# ---------------------------------------------------------------------------------------------
# independent references
# ---------------------------------------------------------------------------------------------
def test_llm_matches_transformers_qwen2(folder):
    """QWen = Qwen2 (q/k/v with bias, o without) once c_attn is split into its [Q | K | V] blocks and the MLP's
    w2 / w1 are named gate / up."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = loaded(folder).model
    c = model.config
    qcfg = Qwen2Config(hidden_size=c.hidden_size, intermediate_size=c.mlp_width, num_attention_heads=c.num_attention_heads,
                       num_key_value_heads=c.num_attention_heads, num_hidden_layers=c.num_hidden_layers,
                       vocab_size=c.vocab_size, rms_norm_eps=c.layer_norm_epsilon, rope_theta=c.rotary_emb_base,
                       max_position_embeddings=4096, tie_word_embeddings=False, use_sliding_window=False)
    qcfg._attn_implementation = "eager"
    ref = Qwen2ForCausalLM(qcfg).eval()
    src = model.state_dict()
    d = c.hidden_size
    sd = {"model.embed_tokens.weight": src["transformer.wte.weight"], "model.norm.weight": src["transformer.ln_f.weight"],
          "lm_head.weight": src["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        p, q = f"transformer.h.{i}.", f"model.layers.{i}."
        for j, n in enumerate("qkv"):
            sd[q + f"self_attn.{n}_proj.weight"] = src[p + "attn.c_attn.weight"][j * d:(j + 1) * d]
            sd[q + f"self_attn.{n}_proj.bias"] = src[p + "attn.c_attn.bias"][j * d:(j + 1) * d]
        sd[q + "self_attn.o_proj.weight"] = src[p + "attn.c_proj.weight"]
        for a, b in (("w2", "gate_proj"), ("w1", "up_proj"), ("c_proj", "down_proj")):
            sd[q + f"mlp.{b}.weight"] = src[p + f"mlp.{a}.weight"]
        sd[q + "input_layernorm.weight"] = src[p + "ln_1.weight"]
        sd[q + "post_attention_layernorm.weight"] = src[p + "ln_2.weight"]
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m]
    ids = torch.randint(0, c.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.lm_head(model.transformer(input_ids=ids.to(DEVICE)).last_hidden_state)
        theirs = ref.to(DEVICE)(input_ids=ids.to(DEVICE)).logits
    assert rel(ours, theirs) < 1e-5


def _deinterleave(w: torch.Tensor, heads: int) -> list[torch.Tensor]:
    """The ViT's per-head [q_h; k_h; v_h] rows -> the blocked q, k, v of a stock attention."""
    hd = w.shape[0] // (3 * heads)
    w = w.reshape(heads, 3, hd, *w.shape[1:])
    return [w[:, j].reshape(heads * hd, *w.shape[3:]) for j in range(3)]


def test_vision_tower_matches_stock_clip_layers_and_multihead_attention(folder):
    """The whole tower against stock parts: transformers' CLIP encoder layers (exact GELU) for the blocks after
    de-interleaving in_proj, torch's MultiheadAttention for the resampler, F.interpolate for both position
    tables; a multi-image batch."""
    from transformers import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    model = loaded(folder).model
    v = model.config.visual
    vis = model.transformer.visual
    pix = torch.randn(2, 3, v.image_size, v.image_size, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ccfg = CLIPVisionConfig(hidden_size=v.width, intermediate_size=v.mlp_width, num_attention_heads=v.heads,
                            layer_norm_eps=1e-6, hidden_act="gelu")
    ccfg._attn_implementation = "eager"
    src = {k: t for k, t in model.state_dict().items()}
    with torch.no_grad():
        g = v.grid
        x = F.conv2d(pix, src["transformer.visual.conv1.weight"], stride=v.patch_size).flatten(2).transpose(1, 2)
        table = src["transformer.visual.positional_embedding"].reshape(1, 16, 16, -1).permute(0, 3, 1, 2)
        x = x + F.interpolate(table, size=(g, g), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(g * g, -1)
        x = F.layer_norm(x, (v.width,), src["transformer.visual.ln_pre.weight"], src["transformer.visual.ln_pre.bias"], 1e-6)
        for i in range(v.layers):
            p = f"transformer.visual.transformer.resblocks.{i}."
            layer = CLIPEncoderLayer(ccfg).to(DEVICE).eval()
            sd = {"layer_norm1.weight": src[p + "ln_1.weight"], "layer_norm1.bias": src[p + "ln_1.bias"],
                  "layer_norm2.weight": src[p + "ln_2.weight"], "layer_norm2.bias": src[p + "ln_2.bias"],
                  "self_attn.out_proj.weight": src[p + "attn.out_proj.weight"],
                  "self_attn.out_proj.bias": src[p + "attn.out_proj.bias"],
                  "mlp.fc1.weight": src[p + "mlp.c_fc.weight"], "mlp.fc1.bias": src[p + "mlp.c_fc.bias"],
                  "mlp.fc2.weight": src[p + "mlp.c_proj.weight"], "mlp.fc2.bias": src[p + "mlp.c_proj.bias"]}
            for n, wq, bq in zip("qkv", _deinterleave(src[p + "attn.in_proj.weight"], v.heads),
                                 _deinterleave(src[p + "attn.in_proj.bias"], v.heads)):
                sd[f"self_attn.{n}_proj.weight"], sd[f"self_attn.{n}_proj.bias"] = wq, bq
            layer.load_state_dict(sd)
            y = layer(x, None)
            x = y[0] if isinstance(y, tuple) else y
        # resampler: one nn.MultiheadAttention fed as the original feeds it (sequence-first)
        d = v.output_dim
        a = "transformer.visual.attn_pool."
        mha = torch.nn.MultiheadAttention(d, v.resampler_heads).to(DEVICE).eval()
        mha.load_state_dict({"in_proj_weight": torch.cat([src[a + f"attn.{n}_proj.weight"] for n in "qkv"]),
                             "in_proj_bias": torch.cat([src[a + f"attn.{n}_proj.bias"] for n in "qkv"]),
                             "out_proj.weight": src[a + "attn.out_proj.weight"],
                             "out_proj.bias": src[a + "attn.out_proj.bias"]})
        kv = F.layer_norm(x @ src[a + "kv_proj.weight"].t(), (d,), src[a + "ln_kv.weight"], src[a + "ln_kv.bias"], 1e-6)
        pos = src[a + "pos_embed"]
        pos_k = F.interpolate(pos.reshape(1, 16, 16, d).permute(0, 3, 1, 2), size=(g, g), mode="bicubic",
                              align_corners=False).permute(0, 2, 3, 1).reshape(g * g, d)
        q = F.layer_norm(src[a + "query"], (d,), src[a + "ln_q.weight"], src[a + "ln_q.bias"], 1e-6) + pos
        out = mha(q[:, None].expand(-1, 2, -1), (kv + pos_k).transpose(0, 1), kv.transpose(0, 1))[0].transpose(0, 1)
        out = F.layer_norm(out, (d,), src["transformer.visual.ln_post.weight"], src["transformer.visual.ln_post.bias"], 1e-6)
        ref = out @ src["transformer.visual.proj.weight"].t()
        ours = vis(pix)
    assert ours.shape == (2, 256, d)
    assert rel(ours, ref) < 1e-5


def test_stored_resampler_positions_are_the_mae_sincos_table():
    t = sincos_2d(8, 16, 16)                     # [256, 8]: column channels first, then row channels
    row, col = 2, 5
    omega = 1.0 / 10000 ** (torch.arange(2) / 2.0)
    expect = torch.cat([torch.sin(col * omega), torch.cos(col * omega), torch.sin(row * omega), torch.cos(row * omega)])
    assert torch.allclose(t[row * 16 + col], expect, atol=1e-6)


def test_dynamic_ntk_and_logn_only_past_seq_length(folder):
    assert [ntk_alpha(n, 2048) for n in (300, 2048, 2049, 4096, 4097, 8192)] == [1, 1, 3, 3, 7, 7]
    model = loaded(folder).model
    t = model.transformer
    assert t._logn(torch.arange(2048)[None], torch.float32) is None
    f = t._logn(torch.arange(4096)[None], torch.float32)[0]
    assert f[2047] == 1 and abs(float(f[4095]) - torch.log(torch.tensor(4096.0)) / torch.log(torch.tensor(2048.0))) < 1e-6


# ---------------------------------------------------------------------------------------------
# prompts and image spans
# ---------------------------------------------------------------------------------------------
def test_prompt_has_one_256_slot_span_per_image(folder):
    ld = loaded(folder)
    proc, tok = ld.processor, ld.processor.tokenizer
    imgs = [Image.new("RGB", (90, 40), (200, 10, 10)), Image.new("RGB", (30, 60), (0, 0, 255))]
    out = proc("Which is red?", imgs)
    ids = out["input_ids"][0].tolist()
    assert out["pixel_values"].shape == (2, 3, 56, 56)
    mask = registry.get("qwenvl").visual_token_mask(ld, out)[0]
    spans = tok.image_slots(ids)
    assert len(spans) == 2 and int(mask.sum()) == 512
    assert all(bool(mask[a + 1:b].all()) and not bool(mask[a]) and not bool(mask[b]) for a, b in spans)
    raw, _ = tok.make_context(proc.query("Which is red?", 2))
    assert "Picture 1: <img></img>\nPicture 2: <img></img>\nWhich is red?" in raw
    tail = [tok.im_start_id, *tok.encode("assistant\n")]
    assert ids[0] == tok.im_start_id and ids[-len(tail):] == tail
    with_paths = proc("Which?", imgs[:1], image_paths=["/data/a.png"])["input_ids"][0].tolist()
    a, _ = tok.image_slots(with_paths)[0]
    assert with_paths[a + 1:a + 12] == list(b"/data/a.png")
    with torch.no_grad():  # two images in one prompt run through the model
        assert ld.model(**{k: v.to(DEVICE) for k, v in out.items()}).logits.shape[1] == len(ids)


def test_generate_matches_full_forward(folder):
    ad = registry.get("qwenvl")
    ld = loaded(folder)
    b = batches(ad, ld, n=1, seed=2)[0]
    with torch.no_grad():
        g = ld.model.generate(**b, max_new_tokens=5, eos_token_id=[-1])
        full = ld.model(input_ids=g[:, :-1], pixel_values=b["pixel_values"]).logits
    n = b["input_ids"].shape[1]
    assert torch.equal(full[0, n - 1:].argmax(-1), g[0, n:])


# ---------------------------------------------------------------------------------------------
# rotation, AIFS, the pipeline
# ---------------------------------------------------------------------------------------------
def test_rotation_of_both_stacks_and_the_resampler_keeps_logits(folder):
    ad = registry.get("qwenvl")
    base = loaded(folder)
    bs = batches(ad, base)
    ref = logits(base.model, bs)
    rot, report = rotated(ad, base)
    assert rel(logits(rot.model, bs), ref) <= 1e-4
    rm = rot.model
    assert len(report.rotation["visual"]["online_hadamard"]) == 2 == len(report.rotation["llm"]["online_hadamard"])
    assert report.rotation["connector"]["rotate_ov"] == ["transformer.visual.attn_pool.attn"]
    # ln_pre became a weightless LayerNorm + the linear that writes the rotated stream
    assert isinstance(rm.transformer.visual.ln_pre, torch.nn.Sequential)
    assert rm.transformer.visual.ln_pre[0].weight is None
    assert isinstance(rm.transformer.visual.transformer.resblocks[0].ln_1, ru.RMSNorm)
    assert rm.transformer.visual.transformer.resblocks[0].ln_1.center is not None  # the stream keeps its mean
    # each rotation is real: the resampler's V rows and the LLM's embedding changed
    k = "transformer.visual.attn_pool.attn.v_proj.weight"
    assert not torch.allclose(rm.state_dict()[k], base.model.state_dict()[k])


def test_rotation_negative_controls(folder, monkeypatch):
    """The interleaved ViT in_proj layout, the kept stream mean and the resampler's own V/O layout all matter."""
    ad = registry.get("qwenvl")
    base = loaded(folder)
    bs = batches(ad, base, n=2)
    ref = logits(base.model, bs)
    vision = qvl_adapter.vision_stack

    def blocked(model):
        s = vision(model)
        return dataclasses.replace(s, block=dataclasses.replace(s.block, attn=dataclasses.replace(
            s.block.attn, qkv_layout="blocked")))

    monkeypatch.setattr(qvl_adapter, "vision_stack", blocked)
    assert rel(logits(rotated(ad, base)[0].model, bs), ref) > 1e-2
    monkeypatch.setattr(qvl_adapter, "vision_stack", lambda m: dataclasses.replace(vision(m), keep_mean=False))
    assert rel(logits(rotated(ad, base)[0].model, bs), ref) > 1e-3
    monkeypatch.undo()
    sites = qvl_adapter.QwenVLAdapter.attention_sites

    def wrong_heads(self, model):  # the resampler's V/O Hadamard over 96-wide "heads" instead of its 128-wide ones
        s = sites(self, model)[0]
        return [dataclasses.replace(s, attn=dataclasses.replace(s.attn, num_heads=4, num_kv_heads=4, head_dim=96))]

    monkeypatch.setattr(qvl_adapter.QwenVLAdapter, "attention_sites", wrong_heads)
    assert rel(logits(rotated(ad, base)[0].model, bs), ref) > 1e-3


def test_aifs_is_invariant_and_msq_scales_do_not_depend_on_it(folder, monkeypatch):
    aifs_calls = count_aifs_attention(monkeypatch)
    ad = registry.get("qwenvl")
    base = loaded(folder)
    sw = Loaded(copy.deepcopy(base.model), base.processor, base.path)
    pipeline.rebuild(QuantConfig(aifs=True), ad, sw)
    bs = batches(ad, base, n=2, seed=7)
    assert torch.allclose(logits(sw.model, bs), logits(base.model, bs), atol=1e-5, rtol=0)
    assert aifs_calls  # the prefill ran attention in the original order
    with torch.no_grad():
        g0 = base.model.generate(**bs[0], max_new_tokens=6, eos_token_id=[-1])
        g1 = sw.model.generate(**bs[0], max_new_tokens=6, eos_token_id=[-1])
    assert g0.shape[1] == bs[0]["input_ids"].shape[1] + 6 and torch.equal(g0, g1)

    def calibrated(aifs):
        ld = Loaded(copy.deepcopy(base.model), base.processor, base.path)
        cfg = QuantConfig(aifs=aifs)
        cfg.llm.quantize = cfg.llm.act.static = True
        cfg.llm.act.bits, cfg.llm.weight.rtn = 8, True
        pipeline.run(cfg, ad, ld, bs, bs)
        return {n: m.input_quantizer.scale.clone() for n, m in ld.model.named_modules()
                if getattr(m, "input_quantizer", None) is not None and n.startswith("transformer.h.")}

    on, off = calibrated(True), calibrated(False)
    assert set(on) == set(off) and len(on) == 2 * 5
    assert all(v.numel() == 2 for v in on.values())          # a visual and a text scale per activation
    assert all(torch.allclose(on[k], off[k], rtol=1e-5) for k in on)


HEADLINE = ("--rotate --rotate_visual_clip --rotate_visual_cross_attn --rotate_llm --visual_w_bits 4 --visual_a_bits 8 "
            "--llm_w_bits 4 --llm_a_bits 8 --quant --quant_llm --quant_visual_clip --quant_cross_attention "
            "--visual_w_clip --llm_w_clip --visual_static --llm_static --online_llm_hadamard --act_order "
            "--dataset_name OCRBench --nsamples 128 --calib_num 128 --online_visual_hadamard --visual_split").split()


def _smaller(flags, n="2"):
    out = list(flags)
    for f in ("--nsamples", "--calib_num"):
        out[out.index(f) + 1] = n
    return out


def test_headline_command_runs_end_to_end_on_fixtures(tmp_path):
    from fake_quant.quant_utils import PatchConvLinear, QuantLinear

    flags = _smaller(HEADLINE) + ["--model_path", "tiny", "--data_root", FIX, "--max_new_tokens", "3",
                                  "--output_dir", str(tmp_path / "o")]
    out = main("qwenvl", flags)
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    ev = res["evaluation"]
    assert ev["rows_scored"] == 12 - 2 and {"Final Score", "Final Score Norm"} <= set(ev["scores"])
    model = out["loaded"].model
    qls = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert all(q.weight_quantized and q.input_quantizer.is_frozen for q in qls.values())
    assert isinstance(model.transformer.visual.conv1, PatchConvLinear)
    pool = [n for n in qls if ".attn_pool." in n]
    assert sorted(n.rsplit(".", 1)[-1] for n in pool) == ["k_proj", "kv_proj", "out_proj", "q_proj", "v_proj"]
    assert "transformer.visual.proj" in qls
    # the resampler: static visual-part scales (one set), the LLM: MSQ's two
    assert {qls[n].input_quantizer.num_row_groups for n in pool} == {1}
    assert {q.input_quantizer.num_row_groups for n, q in qls.items() if n.startswith("transformer.h.")} == {2}
    assert res["pipeline"]["rotation"]["connector"]["rotate_ov"] == ["transformer.visual.attn_pool.attn"]


def test_headline_command_without_a_checkpoint_fails_first(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main("qwenvl", _smaller(HEADLINE) + ["--data_root", FIX])
    err = capsys.readouterr().err
    assert "weights/Qwen-VL-Chat" in err and "--model_path" in err and "tiny" in err
    with pytest.raises(SystemExit):
        main("qwenvl", _smaller(HEADLINE) + ["--model_path", "tiny", "--data_root", str(tmp_path)])
    err = capsys.readouterr().err
    assert "OCRBench.tsv" in err and "--data_root" in err


def test_dump_load_and_offload_give_the_same_model(folder, tmp_path):
    """--dump_gptq / --load_gptq give identical logits without redoing GPTQ; --offload streams the blocks and gives
    the same model."""
    ad = registry.get("qwenvl")
    base = loaded(folder)
    bs = batches(ad, base, n=2, seed=31)
    drop = ("--dataset_name", "OCRBench", "--act_order", "--visual_w_clip", "--llm_w_clip")  # RTN keeps it quick
    flags = _smaller(["--model_path", folder, *[f for f in HEADLINE if f not in drop]])
    flags += ["--aifs", "--visual_w_rtn", "--llm_w_rtn"]
    dump = tmp_path / "ckpt.pth"  # the reference commands name a .pth; it is a folder here
    first = main("qwenvl", flags + ["--dump_gptq", str(dump), "--output_dir", str(tmp_path / "a")])
    second = main("qwenvl", flags + ["--load_gptq", str(dump), "--output_dir", str(tmp_path / "b")])
    assert torch.equal(logits(first["loaded"].model, bs), logits(second["loaded"].model, bs))
    assert "weights:llm" not in second["results"]["pipeline"]["seconds"]
    off = main("qwenvl", flags + ["--offload", "--output_dir", str(tmp_path / "c")])
    assert len(off["loaded"].offloader.blocks) == 4  # 2 ViT blocks + 2 QWen layers
    assert torch.equal(logits(first["loaded"].model, bs), logits(off["loaded"].model, bs))
