"""MiniCPM-V 2.6 on our own modelling code: loading the original format, the original's position bucketing and
slicing, independent references (transformers' SigLIP encoder layers, torch's MultiheadAttention, transformers'
beam search), rotation invariance with negative controls, AIFS / MSQ on multi-slice images, the W4A8 flag set."""
import copy
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fake_quant import pipeline
from fake_quant import rotation_utils as ru
from fake_quant.config import QuantConfig
from model import registry
from model.base import Loaded, Sample
from model.minicpmv import adapter as mcv_adapter
from model.minicpmv import processor as mp
from model.minicpmv.loading import load
from model.minicpmv.tiny import write_checkpoint
from model.minicpmv.vision import position_ids
from model.resampler import sincos_2d
from tests import DEVICE, main
from tests.helpers import count_aifs_attention, logits, rel, rotated, stored_tensors

FIX = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_checkpoint(str(tmp_path_factory.mktemp("mcv")), seed=3)


def loaded(path):
    model, proc = load(path, DEVICE, torch.float32)
    return Loaded(model, proc, path)


def images():
    """A wide image (sliced 3 x 1 at the tiny 56-px scale), a tall one and a small one (one upscaled view)."""
    g = torch.Generator().manual_seed(5)
    def img(w, h):
        return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())
    return [img(150, 50), img(60, 110), img(40, 40)]


def batches(ad, ld):
    return [ad.build_inputs(ld, Sample([im], q), DEVICE) for im, q in zip(images(), ("What is it?", "Red?", "Count"))]


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def test_checkpoint_in_the_original_format_loads(folder):
    stored = stored_tensors(folder)
    d = 384
    assert stored["resampler.attn.in_proj_weight"].shape == (3 * d, d) and stored["resampler.proj"].shape == (d, d)
    assert stored["vpm.embeddings.position_embedding.weight"].shape == (36, 48)  # 6 x 6 patches
    assert "resampler.pos_embed" not in stored and not [k for k in stored if "q_proj" in k and "resampler" in k]
    assert {"llm.model.embed_tokens.weight", "llm.lm_head.weight", "vpm.post_layernorm.bias"} <= set(stored)
    ours = loaded(folder).model.state_dict()
    assert torch.equal(ours["resampler.proj.weight"], stored["resampler.proj"].t())
    assert torch.equal(ours["resampler.attn.v_proj.weight"], stored["resampler.attn.in_proj_weight"][2 * d:])


def test_missing_misshaped_and_foreign_files_are_refused(tmp_path):
    key = "vpm.encoder.layers.1.mlp.fc2.weight"
    with pytest.raises(ValueError, match=r"lacks 1 tensor\(s\) the model needs: " + key.replace(".", r"\.")):
        load(write_checkpoint(str(tmp_path / "m"), drop=(key,)))
    key = "resampler.kv_proj.weight"
    with pytest.raises(ValueError, match=r"tensor " + key.replace(".", r"\.") + r" has shape \(384, 40\)"):
        load(write_checkpoint(str(tmp_path / "s"), reshape={key: (384, 40)}))
    folder = write_checkpoint(str(tmp_path / "c"), shards=1)
    cfg_file = os.path.join(folder, "config.json")
    cfg = json.load(open(cfg_file))
    json.dump({**cfg, "version": 2.5}, open(cfg_file, "w"))
    with pytest.raises(ValueError, match="version 2.5 is not supported"):
        load(folder)
    json.dump(cfg, open(cfg_file, "w"))
    os.remove(os.path.join(folder, "vocab.json"))
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load(folder)


def test_a_dropped_last_vision_layer_is_not_loaded(tmp_path):
    folder = write_checkpoint(str(tmp_path / "d"), shards=1, drop_vision_last_layer=True)
    model, _ = load(folder)
    assert len(model.vpm.encoder.layers) == 1


# ---------------------------------------------------------------------------------------------
# the original's position buckets and slicing
# ---------------------------------------------------------------------------------------------
def _recipe(n_rows: int, n_cols: int, side: int = 70) -> list[int]:
    """The original recipe, written out: float32 step 1/n from an int32 n, float32 boundaries, right buckets."""
    bounds = torch.arange(1 / side, 1.0, 1 / side)
    rows = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / torch.tensor(n_rows, dtype=torch.int32)), bounds, right=True)
    cols = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / torch.tensor(n_cols, dtype=torch.int32)), bounds, right=True)
    return [int(r) * side + int(c) for r in rows for c in cols]


@pytest.mark.parametrize("n", [25, 49, 50, 55, 58])
def test_position_buckets_follow_the_original_float32_recipe(n):
    ids = position_ids(torch.tensor([[n, 3], [2, n]]), 3 * n + 5, 70)
    assert ids[0, :3 * n].tolist() == _recipe(n, 3) and ids[1, :2 * n].tolist() == _recipe(2, n)
    assert ids[0, 3 * n:].eq(0).all()                          # padding
    naive = [(k * 70) // n for k in range(n)]                  # the exact formula is not what the model learned
    assert [i // 70 for i in ids[0, :3 * n:3].tolist()] != naive


@pytest.mark.parametrize("size, grid, source_tgt, slice_tgt", [
    ((448, 448), None, (32, 32), None), ((224, 224), None, (32, 32), None),
    ((640, 480), (2, 1), (28, 37), (39, 26)), ((800, 600), (2, 2), (28, 37), (28, 37)),
    ((1344, 1344), (3, 3), (32, 32), (32, 32)), ((1920, 1080), (4, 2), (24, 43), (34, 30)),
    ((2000, 500), (4, 1), (16, 64), (32, 32))])
def test_slicing_matches_hand_computed_cases(size, grid, source_tgt, slice_tgt):
    """The reference table of the original processor at 448 px, 14-px patches, up to 9 slices."""
    assert mp.best_grid(*size, 448, 9) == grid
    source, cells = mp.slice_image(Image.new("RGB", size), 448, 14, 9)
    assert mp.to_strip(source, 14)[1] == source_tgt
    if grid is None:
        assert cells == []
    else:
        assert (len(cells[0]), len(cells)) == grid and mp.to_strip(cells[0][0], 14)[1] == slice_tgt


def test_strips_hold_patches_row_major():
    img = Image.fromarray((torch.arange(28 * 42 * 3) % 251).to(torch.uint8).reshape(28, 42, 3).numpy())
    strip, (rows, cols) = mp.to_strip(img, 14)
    full = (torch.from_numpy(np.asarray(img, dtype="float32")) / 255.0 - 0.5) / 0.5
    assert (rows, cols) == (2, 3) and strip.shape == (3, 14, 6 * 14)
    # patch (1, 2) is the strip's 6th 14-wide block
    assert torch.equal(strip[:, :, 5 * 14:6 * 14], full[14:28, 28:42].permute(2, 0, 1))


def test_placeholder_text_is_byte_exact(folder):
    proc = loaded(folder).processor
    unk = "<unk>" * 16
    assert proc.placeholder(1, (2, 2)) == (f"<image_id>1</image_id><image>{unk}</image>"
                                           f"<slice>{unk}</slice><slice>{unk}</slice>\n<slice>{unk}</slice><slice>{unk}</slice>")
    out = proc("Which?", [images()[0]])
    text = proc.tokenizer.decode(out["input_ids"][0])
    assert "<|im_start|>user\n<image_id>0</image_id><image>" in text and text.endswith("Which?<|im_end|>\n<|im_start|>assistant\n")
    assert out["tgt_sizes"].shape[0] == 1 + 3 and out["pixel_values"].shape[:3] == (4, 3, 14)


# ---------------------------------------------------------------------------------------------
# independent references
# ---------------------------------------------------------------------------------------------
def test_vision_tower_matches_transformers_siglip_layers_per_slice(folder):
    """Padded strips of slices of different sizes through our tower equal each slice run alone through transformers'
    SigLIP encoder layers (tanh GELU), with the conv, our recipe's positions and post_layernorm around them."""
    from transformers import SiglipVisionConfig
    from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

    ld = loaded(folder)
    model = ld.model
    v = model.config.vision
    inp = ld.processor("x", images()[:2])
    pix, sizes = inp["pixel_values"].to(DEVICE), inp["tgt_sizes"]
    scfg = SiglipVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                              num_attention_heads=v.num_attention_heads, layer_norm_eps=1e-6,
                              hidden_act="gelu_pytorch_tanh")
    scfg._attn_implementation = "eager"
    layers = []
    for layer in model.vpm.encoder.layers:
        ref = SiglipEncoderLayer(scfg).to(DEVICE).eval()
        ref.load_state_dict(layer.state_dict())
        layers.append(ref)
    e = model.vpm.embeddings
    with torch.no_grad():
        ours = model.vpm(pix, sizes)
        assert bool((sizes[:, 0] * sizes[:, 1]).unique().numel() > 1)  # the batch really is padded
        for i, (h, w) in enumerate(sizes.tolist()):
            n = h * w
            x = F.conv2d(pix[i:i + 1, :, :, :n * 14], e.patch_embedding.weight, e.patch_embedding.bias, stride=14)
            x = x.flatten(2).transpose(1, 2) + e.position_embedding.weight[torch.tensor(_recipe(h, w, 6))]
            for ref in layers:
                y = ref(x, None)
                x = y[0] if isinstance(y, tuple) else y
            x = model.vpm.post_layernorm(x)
            assert rel(ours[i:i + 1, :n], x) < 1e-5


def test_resampler_matches_multihead_attention_with_key_padding(folder):
    model = loaded(folder).model
    r = model.resampler
    d = r.embed_dim
    sizes = torch.tensor([[3, 5], [4, 4]])
    x = torch.randn(2, 16, 48, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    mha = torch.nn.MultiheadAttention(d, d // 128).to(DEVICE).eval()
    sd = r.attn.state_dict()
    mha.load_state_dict({"in_proj_weight": torch.cat([sd[f"{n}_proj.weight"] for n in "qkv"]),
                         "in_proj_bias": torch.cat([sd[f"{n}_proj.bias"] for n in "qkv"]),
                         "out_proj.weight": sd["out_proj.weight"], "out_proj.bias": sd["out_proj.bias"]})
    with torch.no_grad():
        kv = r.ln_kv(r.kv_proj(x))
        table = sincos_2d(d, 70, 70).reshape(70, 70, d)
        pos = torch.zeros(2, 16, d)
        pad = torch.ones(2, 16, dtype=torch.bool)
        for i, (h, w) in enumerate(sizes.tolist()):
            pos[i, :h * w] = table[:h, :w].reshape(-1, d)
            pad[i, :h * w] = False
        q = r.ln_q(r.query)[:, None].expand(-1, 2, -1)
        ref = mha(q, (kv + pos.to(DEVICE)).transpose(0, 1), kv.transpose(0, 1), key_padding_mask=pad.to(DEVICE))[0]
        ref = r.proj(r.ln_post(ref.transpose(0, 1)))
        assert rel(r(x, sizes), ref) < 1e-5


def test_features_replace_exactly_the_unk_slots(folder):
    """The model's logits equal transformers' Qwen2 run on embeddings spliced by hand: the 16 features of every
    view in prompt order at the <unk> positions between <image>/</image> and <slice>/</slice>."""
    ld = loaded(folder)
    model, tok = ld.model, ld.processor.tokenizer
    inp = ld.processor("Which?", images()[:1])
    ids = inp["input_ids"]
    with torch.no_grad():
        feats = model.vision_features(inp["pixel_values"], inp["tgt_sizes"])
        emb = model.llm.get_input_embeddings()(ids).clone()
        unk = tok.convert_tokens_to_ids("<unk>")
        slots = (ids[0] == unk).nonzero().flatten()
        assert slots.numel() == feats.shape[0] * 16
        emb[0, slots] = feats.reshape(-1, feats.shape[-1])
        ref = model.llm(inputs_embeds=emb).logits
        assert rel(model(**inp).logits, ref) < 1e-6


def test_beam_search_matches_transformers_generate_from_embeddings(folder):
    """VLMEvalKit's decoding (3 beams, repetition penalty 1.2 on the generated tokens) equals transformers'
    generate(inputs_embeds=...), the call the original chat() makes."""
    ld = loaded(folder)
    model = ld.model
    for im, q in zip(images(), ("What is it?", "Red?", "Count")):
        inp = ld.processor(q, [im])
        with torch.no_grad():
            ours = model.generate(**inp, max_new_tokens=12, num_beams=3, repetition_penalty=1.2)
            feats = model.vision_features(inp["pixel_values"], inp["tgt_sizes"])
            emb = model.llm.get_input_embeddings()(inp["input_ids"])
            emb = emb.masked_scatter(model.image_slots(inp["input_ids"])[..., None], feats)
            ref = model.llm.generate(inputs_embeds=emb, attention_mask=inp["attention_mask"], num_beams=3,
                                     repetition_penalty=1.2, do_sample=False, max_new_tokens=12,
                                     eos_token_id=list(model.generation_eos), pad_token_id=0)
        new = ours[0, inp["input_ids"].shape[1]:].tolist()
        ref = [t for t in ref[0].tolist()]
        ref = ref[:next((i + 1 for i, t in enumerate(ref) if t in model.generation_eos), len(ref))]
        assert new == ref


# ---------------------------------------------------------------------------------------------
# rotation, AIFS, the pipeline
# ---------------------------------------------------------------------------------------------
def test_rotation_keeps_logits_on_multi_slice_images(folder, monkeypatch):
    ad = registry.get("minicpmv")
    base = loaded(folder)
    bs = batches(ad, base)
    assert bs[0]["tgt_sizes"].shape[0] > 1  # a sliced image
    ref = logits(base.model, bs)
    rot, report = rotated(ad, base)
    assert rel(logits(rot.model, bs), ref) <= 1e-4
    assert len(report.rotation["visual"]["online_hadamard"]) == 2 and report.rotation["connector"]["rotate_ov"]
    assert isinstance(rot.model.vpm.post_layernorm, ru.RMSNorm) and rot.model.vpm.post_layernorm.center is None
    # negative controls: the resampler's V/O Hadamard over 96-wide "heads", and kv_proj left out of the rotation
    sites = mcv_adapter.MiniCPMVAdapter.attention_sites

    def wrong_heads(self, model):
        s = sites(self, model)[0]
        return [dataclasses.replace(s, attn=dataclasses.replace(s.attn, num_heads=4, num_kv_heads=4, head_dim=96))]

    monkeypatch.setattr(mcv_adapter.MiniCPMVAdapter, "attention_sites", wrong_heads)
    assert rel(logits(rotated(ad, base)[0].model, bs), ref) > 1e-3
    monkeypatch.undo()
    stack = mcv_adapter.vision_stack
    monkeypatch.setattr(mcv_adapter, "vision_stack", lambda m: dataclasses.replace(stack(m), readers=()))
    assert rel(logits(rotated(ad, base)[0].model, bs), ref) > 1e-2


def test_aifs_is_invariant_on_sliced_images_and_msq_scales_do_not_depend_on_it(folder, monkeypatch):
    aifs_calls = count_aifs_attention(monkeypatch)
    ad = registry.get("minicpmv")
    base = loaded(folder)
    sw = Loaded(copy.deepcopy(base.model), base.processor, base.path)
    pipeline.rebuild(QuantConfig(aifs=True), ad, sw)
    bs = batches(ad, base)
    mask = ad.visual_token_mask(base, bs[0])[0]
    assert int(mask.sum()) == 16 * bs[0]["tgt_sizes"].shape[0] and not bool(mask[-1])
    assert torch.allclose(logits(sw.model, bs), logits(base.model, bs), atol=1e-5, rtol=0)
    assert aifs_calls  # the prefill ran attention in the original order
    with torch.no_grad():  # beam search through the permuted prefill and its cache
        g0 = base.model.generate(**bs[0], max_new_tokens=6, num_beams=3, repetition_penalty=1.2, eos_token_id=[-1])
        g1 = sw.model.generate(**bs[0], max_new_tokens=6, num_beams=3, repetition_penalty=1.2, eos_token_id=[-1])
    assert torch.equal(g0, g1) and g0.shape[1] == bs[0]["input_ids"].shape[1] + 6

    def calibrated(aifs):
        ld = Loaded(copy.deepcopy(base.model), base.processor, base.path)
        cfg = QuantConfig(aifs=aifs)
        cfg.llm.quantize = cfg.llm.act.static = True
        cfg.llm.act.bits, cfg.llm.weight.rtn = 8, True
        pipeline.run(cfg, ad, ld, bs, bs)
        return {n: m.input_quantizer.scale.clone() for n, m in ld.model.named_modules()
                if getattr(m, "input_quantizer", None) is not None and n.startswith("llm.model.layers.")}

    on, off = calibrated(True), calibrated(False)
    assert len(on) == 2 * 7 and all(v.numel() == 2 for v in on.values())
    assert all(torch.allclose(on[k], off[k], rtol=1e-5) for k in on)


W4A8 = ("--rotate --rotate_visual_clip --rotate_visual_cross_attn --rotate_llm --visual_w_bits 4 --visual_a_bits 8 "
        "--llm_w_bits 4 --llm_a_bits 8 --quant --quant_llm --quant_visual_clip --quant_cross_attention --visual_w_clip "
        "--llm_w_clip --visual_static --llm_static --online_llm_hadamard --act_order --online_visual_hadamard "
        "--visual_split --aifs --nsamples 2 --calib_num 2").split()


def test_w4a8_flag_set_end_to_end_and_dump_load(tmp_path):
    from fake_quant.quant_utils import PatchConvLinear, QuantLinear

    out = main("minicpmv", ["--model_path", "tiny", *W4A8, "--dataset_name", "OCRBench", "--data_root", FIX,
                            "--max_new_tokens", "3", "--eval_num", "3", "--output_dir", str(tmp_path / "o"),
                            "--dump_gptq", str(tmp_path / "ckpt")])
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["evaluation"]["rows_scored"] == 3 and "Final Score" in res["evaluation"]["scores"]
    model = out["loaded"].model
    qls = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert all(q.weight_quantized and q.input_quantizer.is_frozen for q in qls.values())
    assert isinstance(model.vpm.embeddings.patch_embedding, PatchConvLinear)
    assert sorted(n.rsplit(".", 1)[-1] for n in qls if n.startswith("resampler")) == [
        "k_proj", "kv_proj", "out_proj", "proj", "q_proj", "v_proj"]
    again = main("minicpmv", ["--model_path", "tiny", *W4A8, "--load_gptq", str(tmp_path / "ckpt"),
                              "--output_dir", str(tmp_path / "b")])
    ad = out["adapter"]
    bs = batches(ad, out["loaded"])
    assert torch.equal(logits(model, bs), logits(again["loaded"].model, bs))


def test_greedy_flag_overrides_the_beam_search_default(tmp_path):
    flags = ["--model_path", "tiny", "--dataset_name", "TextVQA_VAL", "--data_root", FIX, "--eval_num", "2",
             "--max_new_tokens", "4", "--nsamples", "1"]
    beams = main("minicpmv", flags + ["--output_dir", str(tmp_path / "b")])["results"]
    greedy = main("minicpmv", flags + ["--greedy", "--output_dir", str(tmp_path / "g")])["results"]
    assert beams["decoding"] == {"num_beams": 3, "repetition_penalty": 1.2}
    assert greedy["decoding"] == {"num_beams": 1, "repetition_penalty": 1.0}
    with pytest.raises(SystemExit):
        main("minicpmv", flags + ["--data_root", str(tmp_path)])  # no TextVQA_VAL.tsv there: refused before loading


def test_id_zero_is_hidden_and_answers_keep_special_tokens_as_the_original(folder):
    """The original masks every id-0 token ("!") out of attention and numbers positions over the rest; its answer
    text drops id 0 and keeps special tokens."""
    ld = loaded(folder)
    proc, model, tok = ld.processor, ld.model, ld.processor.tokenizer
    assert tok.convert_ids_to_tokens(0) == "!"
    bang = proc("Red!", images()[2:])
    assert (bang["input_ids"][0] == 0).any() and bang["attention_mask"][0].tolist() == (bang["input_ids"][0] != 0).long().tolist()
    with torch.no_grad():
        ref = model.llm.model(inputs_embeds=model.llm.get_input_embeddings()(bang["input_ids"]).masked_scatter(
            model.image_slots(bang["input_ids"])[..., None],
            model.vision_features(bang["pixel_values"], bang["tgt_sizes"])),
            attention_mask=bang["attention_mask"],
            position_ids=(bang["attention_mask"].cumsum(-1) - 1).clamp(min=0)).last_hidden_state
        assert rel(model(**bang).logits, model.llm.lm_head(ref)) < 1e-6
    box = tok.convert_tokens_to_ids("<box>")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    ids = tok("red", add_special_tokens=False)["input_ids"]
    assert proc.decode([0, *ids, box, 0, end, *ids]) == "red<box>"


def test_added_tokens_get_the_ids_the_tokenizer_config_gives(folder):
    """transformers' own Qwen2 tokenizer (no remote code) gives every added token the id tokenizer_config.json's
    added_tokens_decoder assigns it, and encodes the markers and <unk> as single tokens."""
    tok = loaded(folder).processor.tokenizer
    decoder = json.load(open(os.path.join(folder, "tokenizer_config.json")))["added_tokens_decoder"]
    assert decoder and all(tok.convert_tokens_to_ids(t["content"]) == int(i) for i, t in decoder.items())
    for t in ("<image>", "</slice>", "<image_id>", "<unk>", "<|im_end|>"):
        assert tok(t, add_special_tokens=False)["input_ids"] == [int(next(i for i, d in decoder.items()
                                                                          if d["content"] == t))]
