"""InternVL2 with our own modelling code, on tiny random checkpoints written in the original format."""
import copy
import dataclasses
import json
import os

import pytest
import torch
from PIL import Image

from fake_quant import pipeline
from fake_quant import rotation_utils as ru
from fake_quant.config import QuantConfig
from model import registry
from model.base import Loaded
from model.internvl2 import adapter as ivl_adapter
from model.internvl2 import processor as ivp
from model.internvl2.loading import load
from model.internvl2.modeling import pixel_shuffle
from model.internvl2.tiny import ADDED_TOKENS, write_checkpoint
from tests import DEVICE, main
from tests.helpers import count_aifs_attention, batches, logits, rel, stored_tensors

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
KINDS = ("internlm2", "qwen2")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {k: write_checkpoint(str(tmp_path_factory.mktemp(f"ivl-{k}")), llm=k, seed=3) for k in KINDS}


def loaded(folder):
    model, proc = load(folder, DEVICE, torch.float32)
    return Loaded(model, proc, folder)


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_loads_every_tensor_by_its_original_name(folders, kind):
    folder = folders[kind]
    ld = loaded(folder)
    state = ld.model.state_dict()
    stored = stored_tensors(folder)
    assert set(stored) == set(state)
    assert all(torch.equal(stored[k], state[k].cpu()) for k in stored)
    # original names, e.g. InternLM2's packed grouped-query projection and InternViT's LayerScale
    head = "language_model.output.weight" if kind == "internlm2" else "language_model.lm_head.weight"
    assert {"vision_model.encoder.layers.0.ls1", "vision_model.embeddings.class_embedding", "mlp1.0.weight",
            "mlp1.3.weight", head} <= set(stored)
    if kind == "internlm2":
        assert stored["language_model.model.layers.0.attention.wqkv.weight"].shape == ((4 + 2 * 2) * 20, 80)


def test_missing_tensor_is_named(tmp_path):
    key = "language_model.model.layers.1.feed_forward.w3.weight"
    folder = write_checkpoint(str(tmp_path / "m"), drop=(key,))
    with pytest.raises(ValueError, match=r"lacks 1 tensor\(s\) the model needs: " + key.replace(".", r"\.")):
        load(folder)


def test_misshaped_tensor_is_named(tmp_path):
    key = "vision_model.encoder.layers.0.attn.qkv.weight"
    folder = write_checkpoint(str(tmp_path / "s"), reshape={key: (144, 40)})
    with pytest.raises(ValueError, match=r"tensor " + key.replace(".", r"\.") + r" has shape \(144, 40\), the config "
                                         r"needs \(144, 48\)"):
        load(folder)


def test_bad_folders_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load(str(tmp_path))
    folder = write_checkpoint(str(tmp_path / "c"), shards=1)
    cfg = json.load(open(os.path.join(folder, "config.json")))
    cfg["llm_config"]["architectures"] = ["Phi3ForCausalLM"]
    json.dump(cfg, open(os.path.join(folder, "config.json"), "w"))
    with pytest.raises(ValueError, match=r"llm_config.architectures \['Phi3ForCausalLM'\] is not supported"):
        load(folder)
    os.remove(os.path.join(folder, "tokenizer.model"))
    cfg["llm_config"]["architectures"] = ["InternLM2ForCausalLM"]
    json.dump(cfg, open(os.path.join(folder, "config.json"), "w"))
    with pytest.raises(FileNotFoundError, match="has no tokenizer.model"):
        load(folder)


def test_registry_serves_the_checkpoint_to_the_internvl_script_only(folders):
    assert registry.for_checkpoint(folders["internlm2"], "internvl2").name == "internvl2"
    with pytest.raises(ValueError, match="served by the 'internvl2' family"):
        registry.for_checkpoint(folders["internlm2"], "qwen2vl")


# ---------------------------------------------------------------------------------------------
# independent references: transformers' InternVL (HF format) and Llama
# ---------------------------------------------------------------------------------------------
def _hf_internvl_from(ld):
    """transformers' own InternVL implementation with our checkpoint's weights, renamed into its layout."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    cfg = ld.model.config
    v = cfg.vision
    hf_cfg = InternVLConfig(
        vision_config=dict(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                           num_attention_heads=v.num_attention_heads, num_hidden_layers=v.num_hidden_layers,
                           image_size=[v.image_size] * 2, patch_size=[v.patch_size] * 2, attention_bias=v.qkv_bias,
                           use_qk_norm=False, norm_type="layer_norm", layer_norm_eps=v.layer_norm_eps,
                           use_mean_pooling=True, hidden_act="gelu", layer_scale_init_value=1.0),
        text_config={**{k: x for k, x in cfg.llm.items() if k != "architectures"}, "model_type": "qwen2"},
        image_token_id=ld.model.img_context_token_id, downsample_ratio=cfg.downsample_ratio,
        vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        tie_word_embeddings=False)
    hf = InternVLForConditionalGeneration(hf_cfg).float().eval()
    assert hf.lm_head.weight is not hf.model.language_model.embed_tokens.weight
    ours = ld.model.state_dict()
    E = v.hidden_size
    new = {}
    for k, t in ours.items():
        if k.startswith("language_model.model."):
            new["model.language_model." + k[len("language_model.model."):]] = t
        elif k == "language_model.lm_head.weight":
            new["lm_head.weight"] = t
        elif k.startswith("mlp1."):
            idx, rest = k.split(".")[1], k.split(".", 2)[2]
            new[f"model.multi_modal_projector.{ {'0': 'layer_norm', '1': 'linear_1', '3': 'linear_2'}[idx]}.{rest}"] = t
        elif k.startswith("vision_model.embeddings."):
            name = k.split(".", 2)[2]
            new["model.vision_tower.embeddings." + {"class_embedding": "cls_token",
                                                    "position_embedding": "position_embeddings",
                                                    "patch_embedding.weight": "patch_embeddings.projection.weight",
                                                    "patch_embedding.bias": "patch_embeddings.projection.bias"}[name]] = t
        else:
            layer, name = k.split(".")[3], k.split(".", 4)[4]
            p = f"model.vision_tower.encoder.layer.{layer}."
            if name.startswith("attn.qkv."):
                for part, chunk in zip(("q", "k", "v"), t.split(E, dim=0)):
                    new[p + f"attention.{part}_proj.{name.rsplit('.', 1)[1]}"] = chunk
            else:
                new[p + {"attn.proj.weight": "attention.projection_layer.weight",
                         "attn.proj.bias": "attention.projection_layer.bias", "ls1": "lambda_1", "ls2": "lambda_2",
                         "norm1.weight": "layernorm_before.weight", "norm1.bias": "layernorm_before.bias",
                         "norm2.weight": "layernorm_after.weight", "norm2.bias": "layernorm_after.bias"}.get(name, name)] = t
    missing, unexpected = hf.load_state_dict(new, strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m], (missing, unexpected)
    return hf.to(DEVICE)


def test_vision_tower_shuffle_and_mlp1_match_transformers_internvl(folders):
    """The Qwen2 variant (InternVL2-1B's layout) against transformers' independent InternVL code: same
    ViT, pixel shuffle, mlp1 and image-token placement give the same logits."""
    ld = loaded(folders["qwen2"])
    hf = _hf_internvl_from(ld)
    for b in batches(registry.get("internvl2"), ld, n=2, seed=5):
        assert b["pixel_values"].shape[0] > 1  # several tiles and a thumbnail
        with torch.no_grad():
            ours = ld.model(**b).logits
            ref = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                     pixel_values=b["pixel_values"]).logits
        assert rel(ours, ref) < 1e-5


def test_internlm2_matches_llama_after_unpacking_wqkv(folders):
    """InternLM2 is the Llama architecture with a grouped packed wqkv: split per KV group into q / k / v, its
    weights in transformers' Llama give the same logits (RoPE on halves, RMSNorm, SiLU gate, GQA)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    ld = loaded(folders["internlm2"])
    c = ld.model.config.internlm2()
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                                         num_attention_heads=c.num_attention_heads, num_hidden_layers=c.num_hidden_layers,
                                         num_key_value_heads=c.num_key_value_heads, vocab_size=c.vocab_size,
                                         rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
                                         max_position_embeddings=c.max_position_embeddings,
                                         tie_word_embeddings=False)).float().eval()
    G, hd = c.num_attention_heads // c.num_key_value_heads, c.head_dim
    src = ld.model.language_model.state_dict()
    sd = {"model.embed_tokens.weight": src["model.tok_embeddings.weight"], "model.norm.weight": src["model.norm.weight"],
          "lm_head.weight": src["output.weight"]}
    for i in range(c.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"model.layers.{i}."
        w = src[p + "attention.wqkv.weight"].reshape(c.num_key_value_heads, G + 2, hd, -1)
        sd[q + "self_attn.q_proj.weight"] = w[:, :G].reshape(-1, c.hidden_size)
        sd[q + "self_attn.k_proj.weight"] = w[:, G].reshape(-1, c.hidden_size)
        sd[q + "self_attn.v_proj.weight"] = w[:, G + 1].reshape(-1, c.hidden_size)
        sd[q + "self_attn.o_proj.weight"] = src[p + "attention.wo.weight"]
        for a, b in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            sd[q + f"mlp.{b}.weight"] = src[p + f"feed_forward.{a}.weight"]
        sd[q + "input_layernorm.weight"] = src[p + "attention_norm.weight"]
        sd[q + "post_attention_layernorm.weight"] = src[p + "ffn_norm.weight"]
    missing, unexpected = llama.load_state_dict(sd, strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m]
    ids = torch.randint(0, c.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = ld.model.language_model(input_ids=ids.to(DEVICE)).logits
        ref = llama.to(DEVICE)(input_ids=ids.to(DEVICE)).logits
    assert rel(ours, ref) < 1e-5


# ---------------------------------------------------------------------------------------------
# preprocessing and tokenizer
# ---------------------------------------------------------------------------------------------
def test_pixel_shuffle_concatenates_2x2_neighbours():
    x = torch.arange(4 * 4).float().reshape(1, 4, 4, 1)    # token (r, c) holds 4r + c
    y = pixel_shuffle(x, 0.5, "v2")
    assert y.shape == (1, 2, 2, 4)
    assert y[0, 0, 1].tolist() == [2, 3, 6, 7] and y[0, 1, 0].tolist() == [8, 9, 12, 13]


@pytest.mark.parametrize("size, max_num, grid", [
    ((448, 448), 12, (1, 1)), ((800, 600), 12, (4, 3)), ((1000, 500), 12, (2, 1)),  # tie at 2:1 -> small image keeps 2x1
    ((2000, 1000), 12, (4, 2)), ((600, 2000), 6, (1, 3)), ((800, 600), 1, (1, 1))])
def test_tile_grid_follows_the_closest_aspect_ratio(size, max_num, grid):
    assert ivp.choose_grid(*size, 448, 1, max_num) == grid


def test_tiles_and_prompt(folders):
    ld = loaded(folders["internlm2"])
    proc = ld.processor
    out = proc("What is it?", [Image.new("RGB", (112, 56), (10, 200, 30))], max_num=4)
    assert out["pixel_values"].shape == (3, 3, 56, 56)     # 2x1 tiles + thumbnail
    ids = out["input_ids"][0].tolist()
    ctx = proc.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert ids.count(ctx) == 3 * ld.model.config.num_image_token
    text = proc.prompt("What is it?", [3])
    assert text.startswith("<|im_start|>system\n" + ivp.SYSTEM_MESSAGE + "<|im_end|><|im_start|>user\n<img><IMG_CONTEXT>")
    assert text.endswith("</img>\nWhat is it?<|im_end|><|im_start|>assistant\n")
    assert ids[0] == 1  # BOS
    with pytest.raises(ValueError, match="2 <image> placeholders for 1 images"):
        proc.prompt("<image><image> which?", [1])


def test_sentencepiece_tokenizer_keeps_added_tokens_whole(folders):
    tok = loaded(folders["internlm2"]).processor.tokenizer
    ids = tok.encode("<|im_start|>user\nred circle<|im_end|>", add_special_tokens=False)
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    assert ids[0] == start and ids[-1] == end and start == 320 + ADDED_TOKENS.index("<|im_start|>")
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nred circle<|im_end|>"
    assert tok.decode(ids) == "user\nred circle"


def test_qwen2_tokenizer_from_vocab_and_merges(folders):
    ld = loaded(folders["qwen2"])
    tok, model = ld.processor.tokenizer, ld.model
    assert not os.path.exists(os.path.join(folders["qwen2"], "tokenizer.json"))
    ids = tok.encode("<|im_start|>user\nred circle<|im_end|><img><IMG_CONTEXT></img>")
    assert ids[-2] == model.img_context_token_id == tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert tok.decode(ids) == "user\nred circle"
    assert model.generation_eos == (tok.convert_tokens_to_ids("<|im_end|>"),)


def test_dataset_prompts_and_tiles_follow_vlmevalkit():
    ad = registry.get("internvl2")
    row = {"question": "what is written?"}
    assert ad.prompt("OCRBench", row) == "what is written?\nAnswer the question using a single word or phrase."
    assert ad.prompt("MME", {"question": "Is it red? Please answer yes or no."}).endswith(
        "yes or no. Answer the question using a single word or phrase.")
    assert (ad.max_tiles("OCRBench"), ad.max_tiles("DocVQA_VAL"), ad.max_tiles("TextVQA_VAL"),
            ad.max_tiles(None)) == (24, 18, 6, None)


# ---------------------------------------------------------------------------------------------
# rotation, AIFS, the pipeline
# ---------------------------------------------------------------------------------------------
def _rotated(ad, base, cfg=None):
    rot = Loaded(copy.deepcopy(base.model), base.processor, base.path)
    cfg = cfg or QuantConfig()
    r = cfg.rotation
    r.rotate = r.visual = r.llm = r.online_visual_hadamard = r.online_llm_hadamard = True
    report = pipeline.run(cfg, ad, rot, [], [])
    return rot, report


@pytest.mark.parametrize("kind", KINDS)
def test_rotation_without_quantization_keeps_logits(folders, kind):
    ad = registry.get("internvl2")
    base = loaded(folders[kind])
    bs = batches(ad, base)
    ref = logits(base.model, bs)
    rot, report = _rotated(ad, base)
    assert rel(logits(rot.model, bs), ref) <= 1e-4
    assert len(report.rotation["visual"]["online_hadamard"]) == 2 == len(report.rotation["llm"]["online_hadamard"])
    assert isinstance(rot.model.mlp1[0], ru.RMSNorm) and rot.model.mlp1[0].center.numel() == 4 * 48


def test_rotation_negative_controls(folders, monkeypatch):
    """The grouped wqkv layout and the whole-concatenation centering of mlp1.0 are both needed."""
    ad = registry.get("internvl2")
    base = loaded(folders["internlm2"])
    bs = batches(ad, base, n=2)
    ref = logits(base.model, bs)

    llm = ivl_adapter.internlm2_stack

    def blocked(model):
        s = llm(model)
        attn = dataclasses.replace(s.block.attn, qkv_layout="blocked")
        return dataclasses.replace(s, block=dataclasses.replace(s.block, attn=attn))

    monkeypatch.setattr(ivl_adapter, "internlm2_stack", blocked)
    assert rel(logits(_rotated(ad, base)[0].model, bs), ref) > 1e-2
    monkeypatch.undo()

    vision = ivl_adapter.vision_stack  # baking each token's mean out instead of centering mlp1.0 over all four
    monkeypatch.setattr(ivl_adapter, "vision_stack", lambda m: dataclasses.replace(vision(m), keep_mean=False))
    assert rel(logits(_rotated(ad, base)[0].model, bs), ref) > 1e-3


def test_grouped_v_rows():
    from fake_quant.spec import AttentionSpec

    a = AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=3, qkv="wqkv", o="wo", qkv_layout="grouped")
    # per KV group: 2 q heads, k, v -> 4 heads of 3 rows per group; v is the group's last head
    assert a.v_rows()[1].tolist() == [[9, 10, 11], [21, 22, 23]]
    b = AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=3, qkv="qkv", o="o")
    assert b.v_rows()[1].tolist() == [[18, 19, 20], [21, 22, 23]]


@pytest.mark.parametrize("kind", KINDS)
def test_aifs_is_invariant(folders, kind, monkeypatch):
    aifs_calls = count_aifs_attention(monkeypatch)
    ad = registry.get("internvl2")
    base = loaded(folders[kind])
    sw = Loaded(copy.deepcopy(base.model), base.processor, base.path)
    pipeline.rebuild(QuantConfig(aifs=True), ad, sw)
    bs = batches(ad, base, n=2, seed=7)
    assert torch.allclose(logits(sw.model, bs), logits(base.model, bs), atol=1e-5, rtol=0)
    assert aifs_calls  # the prefill ran attention in the original order
    with torch.no_grad():
        g0 = base.model.generate(**bs[0], max_new_tokens=6, eos_token_id=[-1])
        g1 = sw.model.generate(**bs[0], max_new_tokens=6, eos_token_id=[-1])
    assert g0.shape[1] == bs[0]["input_ids"].shape[1] + 6 and torch.equal(g0, g1)


def test_generate_matches_full_forward(folders):
    """Greedy decoding with the KV cache picks the tokens a full forward over the extended prompt picks."""
    ad = registry.get("internvl2")
    ld = loaded(folders["internlm2"])
    b = batches(ad, ld, n=1, seed=2)[0]
    with torch.no_grad():
        g = ld.model.generate(**b, max_new_tokens=5, eos_token_id=[-1])
        full = ld.model(input_ids=g[:, :-1], pixel_values=b["pixel_values"]).logits
    n = b["input_ids"].shape[1]
    assert torch.equal(full[0, n - 1:].argmax(-1), g[0, n:])


W4A8 = ["--rotate", "--rotate_visual_clip", "--rotate_visual_cross_attn", "--rotate_llm", "--visual_w_bits", "4",
        "--visual_a_bits", "8", "--llm_w_bits", "4", "--llm_a_bits", "8", "--quant", "--quant_llm", "--quant_visual_clip",
        "--quant_cross_attention", "--visual_w_clip", "--llm_w_clip", "--visual_static", "--llm_static",
        "--online_llm_hadamard", "--online_visual_hadamard", "--act_order", "--aifs", "--visual_split"]


@pytest.mark.parametrize("kind", KINDS)
def test_w4a8_mquant_flag_set_end_to_end_on_fixtures(folders, tmp_path, kind):
    ad = registry.get("internvl2")
    base = loaded(folders[kind])
    bs = batches(ad, base, n=3, seed=21)
    ref = logits(base.model, bs)
    flags = ["--model_path", folders[kind], *W4A8, "--nsamples", "3", "--calib_num", "3"]
    out = main("internvl2", flags + ["--dataset_name", "OCRBench", "--data_root", FIX, "--max_new_tokens", "3",
                                     "--output_dir", str(tmp_path / "g")])
    res = json.loads((tmp_path / "g" / "results.json").read_text())
    ev = res["evaluation"]
    assert set(ev["scores"]) >= {"Final Score", "Final Score Norm"} and ev["rows_scored"] == 12 - 3
    assert not {str(i) for i in res["calibration"]["held_out_rows"]} & {
        json.loads(line).get("index") for line in open(ev["predictions_file"])}
    model = out["loaded"].model
    from fake_quant.quant_utils import PatchConvLinear, QuantLinear
    from fake_quant.rms import SplitQuantLinear

    qls = [m for m in model.modules() if isinstance(m, QuantLinear)]
    splits = [m for m in model.modules() if isinstance(m, SplitQuantLinear)]
    assert splits and all(n.startswith("vision_model") for n, m in model.named_modules() if m in splits)  # RMS
    # patch conv + 2 ViT blocks x 4 + mlp1 x 2 + 2 LLM layers x (5 InternLM2 / 7 Qwen2), and an RMS branch per split
    assert len(qls) == 1 + 8 + 2 + (10 if kind == "internlm2" else 14) + len(splits)
    assert all(q.weight_quantized and q.input_quantizer.is_frozen for q in qls)
    assert isinstance(model.vision_model.embeddings.patch_embedding, PatchConvLinear)
    llm_groups = {q.input_quantizer.num_row_groups for n, q in model.named_modules()
                  if isinstance(q, QuantLinear) and n.startswith("language_model")}
    assert llm_groups == {2}  # MSQ: visual and text scale sets
    # GPTQ beats round-to-nearest (the tiny random LM loses ~23% / ~40% of its logits to per-channel W4;
    # the vision part alone costs ~2%)
    rtn = main("internvl2", ["--model_path", folders[kind], *[f for f in W4A8 if f != "--act_order"], "--visual_w_rtn",
                             "--llm_w_rtn", "--nsamples", "3", "--calib_num", "3", "--output_dir", str(tmp_path / "r")])
    e_gptq = float((logits(model, bs) - ref).norm() / ref.norm())
    e_rtn = float((logits(rtn["loaded"].model, bs) - ref).norm() / ref.norm())
    assert e_gptq < 0.3 and e_gptq < 0.8 * e_rtn


def test_internvit_6b_layout_rotates_exactly(tmp_path):
    """InternViT-6B's layout (RMSNorm blocks, qk normalization; InternVL2-26B) with mlp1's LayerNorm: the stream
    keeps its mean, so the fused mlp1.0 centers itself and rotation stays exact."""
    folder = write_checkpoint(str(tmp_path / "v6"), shards=1, vision={"norm_type": "rms_norm", "qk_normalization": True})
    ad = registry.get("internvl2")
    base = loaded(folder)
    assert hasattr(base.model.vision_model.encoder.layers[0].attn, "q_norm")
    bs = batches(ad, base, n=2)
    ref = logits(base.model, bs)
    rot, _ = _rotated(ad, base)
    assert rel(logits(rot.model, bs), ref) <= 1e-4
    assert rot.model.mlp1[0].center is not None and rot.model.vision_model.encoder.layers[0].norm1.center is None


def test_dump_load_offload_and_analysis(folders, tmp_path):
    """The shared run options work on InternVL2: --dump_gptq / --load_gptq give identical logits, --offload gives
    the same model while streaming its blocks, --analysis writes the per-modality activation table."""
    ad = registry.get("internvl2")
    base = loaded(folders["internlm2"])
    bs = batches(ad, base, n=2, seed=31)
    flags = ["--model_path", folders["internlm2"], *W4A8, "--nsamples", "3", "--calib_num", "3"]
    dump = tmp_path / "ckpt"
    first = main("internvl2", flags + ["--dump_gptq", str(dump), "--analysis", str(tmp_path / "an"),
                                       "--output_dir", str(tmp_path / "a")])
    second = main("internvl2", flags + ["--load_gptq", str(dump), "--output_dir", str(tmp_path / "b")])
    assert torch.equal(logits(first["loaded"].model, bs), logits(second["loaded"].model, bs))
    assert "weights:llm" not in second["results"]["pipeline"]["seconds"]
    off = main("internvl2", flags + ["--offload", "--output_dir", str(tmp_path / "c")])
    assert len(off["loaded"].offloader.blocks) == 4  # 2 ViT layers + 2 InternLM2 layers
    assert torch.equal(logits(first["loaded"].model, bs), logits(off["loaded"].model, bs))
    rows = (tmp_path / "an" / "activation_ranges.csv").read_text().splitlines()
    assert any("language_model.model.layers.0.attention.wqkv" in r and "visual" in r for r in rows)


def test_msq_scales_and_logits_equal_with_and_without_aifs(folders, tmp_path):
    """Static W4A8 with MSQ: AIFS moves the <IMG_CONTEXT> rows first and changes nothing the quantizers see.
    (RTN weights: GPTQ's Hessian sums the same rows in another order, which flips a few roundings.)"""
    flags = ["--model_path", folders["internlm2"], *[f for f in W4A8 if f not in ("--aifs", "--act_order")],
             "--visual_w_rtn", "--llm_w_rtn", "--nsamples", "3", "--calib_num", "4"]
    plain = main("internvl2", flags + ["--output_dir", str(tmp_path / "a")])
    switched = main("internvl2", flags + ["--aifs", "--output_dir", str(tmp_path / "b")])
    qs = [[m for n, m in r["loaded"].model.named_modules() if n.startswith("language_model") and
           getattr(m, "num_row_groups", 1) == 2] for r in (plain, switched)]
    assert len(qs[0]) == len(qs[1]) == 10  # 5 linears x 2 InternLM2 layers
    for a, b in zip(*qs):
        assert torch.allclose(a.scale, b.scale, rtol=1e-5)
    ad, lp, ls = plain["adapter"], plain["loaded"], switched["loaded"]
    bs = batches(ad, lp, n=2, seed=41)
    # with the activations quantized the two differ by a few roundings that flip where the permuted attention sums
    # in another order (three elements of the first layer's w2 input on these prompts), amplified by the tiny
    # random LM; with the same weights and activations in FP they agree to float precision
    assert rel(logits(ls.model, bs), logits(lp.model, bs)) < 0.05
    for r in (lp, ls):
        pipeline.set_act_quantizers(r.model, False)
    assert torch.allclose(logits(ls.model, bs), logits(lp.model, bs), atol=1e-5, rtol=0)


def test_select_layer_keeps_only_the_layers_read(tmp_path, caplog):
    folder = write_checkpoint(str(tmp_path / "sel"), shards=1)
    cfg = json.load(open(os.path.join(folder, "config.json")))
    cfg["select_layer"] = -2  # the output of the second-to-last ViT layer
    json.dump(cfg, open(os.path.join(folder, "config.json"), "w"))
    full = loaded(write_checkpoint(str(tmp_path / "full"), shards=1))
    model, _ = load(folder)
    assert len(model.vision_model.encoder.layers) == 1 and "not used" not in caplog.text
    pix = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        first = full.model.vision_model.encoder.layers[0](full.model.vision_model.embeddings(pix.to(DEVICE)))
        assert torch.allclose(model.vision_model(pix), first.cpu(), atol=1e-6)


def test_sentencepiece_tokenizer_follows_the_configs_strip_flags_and_cleans_up(tmp_path):
    from model.internvl2.tokenizer import SentencePieceTokenizer

    folder = write_checkpoint(str(tmp_path / "tok"), shards=1)
    cfg_file = os.path.join(folder, "tokenizer_config.json")
    cfg = json.load(open(cfg_file))
    plain = SentencePieceTokenizer(folder)
    im_start = str(plain.convert_tokens_to_ids("<|im_start|>"))
    cfg["added_tokens_decoder"][im_start].update(rstrip=True, lstrip=True)
    json.dump(cfg, open(cfg_file, "w"))
    strip = SentencePieceTokenizer(folder)
    text = "red  <|im_start|>  blue"
    assert strip.encode(text) == plain.encode("red<|im_start|>blue") != plain.encode(text)
    # transformers' clean-up of the original decoder: no space before punctuation or in contractions
    assert plain.decode(plain.encode("it 's red , is n't it ?")) == "it's red, isn't it?"


def test_real_checkpoint_check_script_runs_our_side_and_compares(folders, tmp_path):
    """scripts/check_internvl_fp.py: the 'ours' and 'compare' steps (the 'reference' step needs the remote code)."""
    import subprocess
    import sys

    img = tmp_path / "img.png"
    Image.new("RGB", (120, 60), (30, 90, 200)).save(img)
    script = os.path.join(os.path.dirname(FIX), "..", "scripts", "check_internvl_fp.py")
    work = tmp_path / "work"
    run = subprocess.run([sys.executable, script, "ours", "--model_path", folders["internlm2"], "--image", str(img),
                          "--work", str(work), "--device", "cpu", "--dtype", "float32", "--max_new_tokens", "3"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    ours = torch.load(work / "ours.pt")
    prompt = json.load(open(work / "prompt.json"))["text"]
    assert prompt.count("<IMG_CONTEXT>") == int((ours["input_ids"] == 320 + ADDED_TOKENS.index("<IMG_CONTEXT>")).sum())
    for scale, expect in ((1.0, 0), (-1.0, 1)):  # an identical reference matches, a negated one does not
        torch.save({"input_ids": ours["input_ids"], "logits": ours["logits"] * scale}, work / "reference.pt")
        cmp = subprocess.run([sys.executable, script, "compare", "--work", str(work)], capture_output=True, text=True)
        assert cmp.returncode == expect and ("MATCH" if expect == 0 else "MISMATCH") in cmp.stdout
