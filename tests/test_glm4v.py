"""GLM-4V on our own modelling code: loading the original format, independent references (transformers' GlmForCausalLM,
a plain-torch EVA2-CLIP tower, a direct splice of the image vectors and positions), generation with padding, rotation
invariance with negative controls, the refusal of a residual rotation of a post-norm stack, AIFS and MSQ."""
import copy
import dataclasses
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from evaluation.builtin import builtin_rows
from fake_quant import pipeline
from fake_quant import rotation_utils as ru
from fake_quant.config import QuantConfig
from model import registry
from model.base import Loaded, Sample
from model.glm4v import adapter as glm_adapter
from model.glm4v.loading import load
from model.glm4v.tiny import write_checkpoint
from tests import DEVICE
from tests.helpers import count_aifs_attention, logits, rel, stored_tensors


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_checkpoint(str(tmp_path_factory.mktemp("glm")), seed=3)


@pytest.fixture(scope="module")
def base(folder):
    model, proc = load(folder, DEVICE, torch.float32)
    return Loaded(model, proc, folder)


def fresh(ld):
    return Loaded(copy.deepcopy(ld.model), ld.processor, ld.path)


def batches(ld, n=2, seed=11):
    ad = registry.get("glm4v")
    return [ad.build_inputs(ld, Sample([r["image"]], r["question"]), DEVICE) for r in builtin_rows(n, seed=seed)]


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def test_checkpoint_in_the_original_format_loads(folder, base):
    stored = stored_tensors(folder)
    cfg = json.load(open(os.path.join(folder, "config.json")))
    assert cfg["architectures"] == ["ChatGLMModel"] and isinstance(cfg["vision_config"], dict)
    d, w, hd = cfg["hidden_size"], cfg["vision_config"]["hidden_size"], cfg["kv_channels"]
    L = "transformer.encoder.layers.0."
    # the original spellings and layouts: packed qkv with a bias ([Q | K | V], 2 KV groups), packed gate/up,
    # the tower's class token as a bare parameter, a conv with a bias, boi / eoi, the RoPE buffer
    assert stored[L + "self_attention.query_key_value.weight"].shape == (d + 2 * 2 * hd, d)
    assert L + "self_attention.query_key_value.bias" in stored and L + "self_attention.dense.bias" not in stored
    assert stored[L + "mlp.dense_h_to_4h.weight"].shape == (2 * cfg["ffn_hidden_size"], d)
    V = "transformer.vision."
    assert stored[V + "transformer.layers.0.attention.query_key_value.weight"].shape == (3 * w, w)
    assert stored[V + "patch_embedding.cls_embedding"].shape == (1, w)
    assert stored[V + "patch_embedding.position_embedding.weight"].shape == (cfg["vision_config"]["num_positions"], w)
    assert stored[V + "conv.weight"].shape == (d, w, 2, 2) and V + "conv.bias" in stored
    assert stored[V + "boi"].shape == (1, 1, d) and V + "linear_proj.norm1.bias" in stored
    assert "transformer.rotary_pos_emb.inv_freq" in stored and "transformer.output_layer.weight" in stored
    ours = base.model.state_dict()
    assert set(ours) == set(stored) - {"transformer.rotary_pos_emb.inv_freq"}
    assert all(torch.equal(ours[k].cpu(), stored[k]) for k in ours)


def test_missing_and_misshaped_tensors_are_named(tmp_path):
    key = "transformer.vision.conv.bias"
    with pytest.raises(ValueError, match=r"lacks 1 tensor\(s\) the model needs: " + key.replace(".", r"\.")):
        load(write_checkpoint(str(tmp_path / "m"), drop=(key,)))
    key = "transformer.encoder.layers.1.self_attention.query_key_value.weight"
    with pytest.raises(ValueError, match=r"tensor " + key.replace(".", r"\.") + r" has shape \(10, 96\), the config "
                                         r"needs \(192, 96\)"):
        load(write_checkpoint(str(tmp_path / "s"), reshape={key: (10, 96)}))


def test_bad_folders_get_clear_errors(tmp_path):
    folder = write_checkpoint(str(tmp_path / "c"), shards=1)
    assert registry.for_checkpoint(folder, "glm4v").name == "glm4v"
    cfg_file = os.path.join(folder, "config.json")
    cfg = json.load(open(cfg_file))
    json.dump({**cfg, "boi_token_id": 5}, open(cfg_file, "w"))
    with pytest.raises(ValueError, match="tokenizer.model does not belong to these weights"):
        load(folder)
    json.dump({**cfg, "quantization_config": {"quant_method": "gptq", "bits": 4}}, open(cfg_file, "w"))
    with pytest.raises(ValueError, match="already quantized.*floating-point glm-4v-9b"):
        load(folder)
    json.dump({**cfg, "vision_config": {**cfg["vision_config"], "num_positions": 50}}, open(cfg_file, "w"))
    with pytest.raises(ValueError, match=r"num_positions 50 != 6\^2 \+ 1"):
        load(folder)
    text_only = {k: v for k, v in cfg.items() if k != "vision_config"}
    json.dump(text_only, open(cfg_file, "w"))
    with pytest.raises(ValueError, match="text-only ChatGLM / GLM-4 checkpoint"):
        load(folder)
    with pytest.raises(ValueError, match="unsupported architecture"):  # the family does not claim a text-only GLM-4
        registry.for_checkpoint(folder, "glm4v")
    json.dump(cfg, open(cfg_file, "w"))
    os.remove(os.path.join(folder, "tokenizer.model"))
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        load(folder)


# ---------------------------------------------------------------------------------------------
# independent references
# ---------------------------------------------------------------------------------------------
def glm_reference(model):
    """transformers' GlmForCausalLM holding our decoder's weights, query_key_value split into q / k / v by rows."""
    from transformers import GlmConfig, GlmForCausalLM

    c = model.config
    gcfg = GlmConfig(vocab_size=c.padded_vocab_size, hidden_size=c.hidden_size, intermediate_size=c.ffn_hidden_size,
                     num_hidden_layers=c.num_layers, num_attention_heads=c.num_attention_heads,
                     num_key_value_heads=c.num_kv_heads, head_dim=c.kv_channels, rms_norm_eps=c.layernorm_epsilon,
                     attention_bias=True, tie_word_embeddings=False, max_position_embeddings=4096, pad_token_id=None,
                     eos_token_id=list(c.eos_ids),
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    gcfg._attn_implementation = "eager"
    ref = GlmForCausalLM(gcfg).eval()
    src = model.state_dict()
    q, kv = c.projection_size, c.num_kv_heads * c.kv_channels
    sd = {"model.embed_tokens.weight": src["transformer.embedding.word_embeddings.weight"],
          "model.norm.weight": src["transformer.encoder.final_layernorm.weight"],
          "lm_head.weight": src["transformer.output_layer.weight"]}
    for i in range(c.num_layers):
        p, r = f"transformer.encoder.layers.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            t = src[p + f"self_attention.query_key_value.{kind}"]
            for n, part in zip("qkv", t.split([q, kv, kv])):
                sd[r + f"self_attn.{n}_proj.{kind}"] = part
        sd[r + "self_attn.o_proj.weight"] = src[p + "self_attention.dense.weight"]
        sd[r + "mlp.gate_up_proj.weight"] = src[p + "mlp.dense_h_to_4h.weight"]
        sd[r + "mlp.down_proj.weight"] = src[p + "mlp.dense_4h_to_h.weight"]
        sd[r + "input_layernorm.weight"] = src[p + "input_layernorm.weight"]
        sd[r + "post_attention_layernorm.weight"] = src[p + "post_attention_layernorm.weight"]
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m]
    return ref.to(DEVICE)


def expected_splice(model, ids, pix):
    """The original's splice, written directly from its rule: token embeddings before boi, then the tower's
    vectors (boi, features, eoi, all / scaling_factor) in place of the three image ids, then the rest; positions
    0..b, b+1 for every feature, then b+2, b+3, ... for eoi and the text."""
    tokens = ids[0].tolist()
    b = tokens.index(model.config.boi_token_id)
    emb = model.get_input_embeddings()(ids)[0]
    vision = vision_reference(model, pix)[0]
    n = vision.shape[0] - 2
    embeds = torch.cat([emb[:b], vision, emb[b + 3:]])
    positions = list(range(b + 1)) + [b + 1] * n + list(range(b + 2, len(tokens)))
    return embeds[None], torch.tensor([positions], device=ids.device), b, n


def test_llm_matches_transformers_glm(base):
    """Our decoder = transformers' GlmForCausalLM once query_key_value is split: on text ids, and on a spliced
    image prompt with its shared position ids."""
    model = base.model
    ref = glm_reference(model)
    ids = torch.randint(0, model.config.padded_vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    t = model.transformer
    with torch.no_grad():
        ours = t.output_layer(t.encoder(inputs_embeds=t.embedding(ids.to(DEVICE))).last_hidden_state)
        theirs = ref(input_ids=ids.to(DEVICE)).logits
        assert rel(ours, theirs) < 1e-5
        b = batches(base, n=1)[0]
        embeds, positions, _, _ = expected_splice(model, b["input_ids"], b["pixel_values"])
        theirs = ref(inputs_embeds=embeds, position_ids=positions).logits
        ours = model(**b).logits
    assert ours.shape == theirs.shape and rel(ours, theirs) < 1e-5


def vision_reference(model, pix):
    """The EVA2-CLIP tower, conv and GLU in plain torch from the facts: patch conv + class token + the whole
    position table; blocks h = x + LN(attn(x)), out = h + LN(mlp(h)) with exact GELU and a softmax attention
    written out; class token dropped; 2x2 stride-2 conv; GLU; boi / eoi around; all / scaling_factor."""
    cfg, v = model.config, model.config.vision
    s = {k: t for k, t in model.state_dict().items() if k.startswith("transformer.vision.")}
    P = "transformer.vision."
    x = F.conv2d(pix, s[P + "patch_embedding.proj.weight"], s[P + "patch_embedding.proj.bias"], stride=v.patch_size)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([s[P + "patch_embedding.cls_embedding"].expand(x.shape[0], 1, -1), x], dim=1)
    x = x + s[P + "patch_embedding.position_embedding.weight"]
    H, D = v.num_heads, v.head_dim
    for i in range(v.num_hidden_layers):
        p = P + f"transformer.layers.{i}."
        qkv = x @ s[p + "attention.query_key_value.weight"].t() + s[p + "attention.query_key_value.bias"]
        q, k, vv = (qkv[..., j * v.hidden_size:(j + 1) * v.hidden_size].reshape(*x.shape[:2], H, D).transpose(1, 2)
                    for j in range(3))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), dim=-1) @ vv
        a = att.transpose(1, 2).reshape(x.shape) @ s[p + "attention.dense.weight"].t() + s[p + "attention.dense.bias"]
        h = x + F.layer_norm(a, (v.hidden_size,), s[p + "input_layernorm.weight"], s[p + "input_layernorm.bias"], 1e-6)
        m = 0.5 * (h @ s[p + "mlp.fc1.weight"].t() + s[p + "mlp.fc1.bias"])
        m = m * (1 + torch.erf(m / 0.5 / math.sqrt(2)))              # exact GELU of 2m
        m = m @ s[p + "mlp.fc2.weight"].t() + s[p + "mlp.fc2.bias"]
        x = h + F.layer_norm(m, (v.hidden_size,), s[p + "post_attention_layernorm.weight"],
                             s[p + "post_attention_layernorm.bias"], 1e-6)
    x = x[:, 1:]
    g = v.grid
    x = F.conv2d(x.reshape(-1, g, g, v.hidden_size).permute(0, 3, 1, 2), s[P + "conv.weight"], s[P + "conv.bias"],
                 stride=2).flatten(2).transpose(1, 2)
    G = P + "linear_proj."
    y = x @ s[G + "linear_proj.weight"].t()
    y = F.gelu(F.layer_norm(y, (cfg.hidden_size,), s[G + "norm1.weight"], s[G + "norm1.bias"], 1e-5))
    y = F.silu(y @ s[G + "gate_proj.weight"].t()) * (y @ s[G + "dense_h_to_4h.weight"].t())
    y = y @ s[G + "dense_4h_to_h.weight"].t()
    n = y.shape[0]
    y = torch.cat([s[P + "boi"].expand(n, -1, -1), y, s[P + "eoi"].expand(n, -1, -1)], dim=1)
    return y / v.scaling_factor


def test_vision_tower_matches_plain_torch(base):
    model = base.model
    v = model.config.vision
    pix = torch.randn(2, 3, v.image_size, v.image_size, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        ours = model.transformer.vision(pix)
        ref = vision_reference(model, pix)
    assert ours.shape == (2, v.image_tokens + 2, model.config.hidden_size) and v.image_tokens == 9
    assert rel(ours, ref) < 1e-5


def test_splice_and_position_ids_match_the_direct_rule(base):
    model = base.model
    b = batches(base, n=1)[0]
    seen = {}

    def grab(mod, args, kwargs):
        seen.update(kwargs)

    h = model.transformer.encoder.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**b)
    finally:
        h.remove()
    with torch.no_grad():
        embeds, positions, boi, n = expected_splice(model, b["input_ids"], b["pixel_values"])
    assert torch.equal(seen["position_ids"], positions)
    assert seen["position_ids"][0, boi + 1:boi + 1 + n].unique().tolist() == [boi + 1]
    assert seen["attention_mask"].shape == positions.shape and bool(seen["attention_mask"].all())
    assert rel(seen["inputs_embeds"], embeds) < 1e-6
    mask = registry.get("glm4v").visual_token_mask(base, b)[0]
    assert mask.shape[0] == positions.shape[1] and mask.nonzero().flatten().tolist() == list(range(boi + 1, boi + 1 + n))


# ---------------------------------------------------------------------------------------------
# prompts and generation
# ---------------------------------------------------------------------------------------------
def test_prompt_is_the_original_template(base):
    proc, tok = base.processor, base.processor.tokenizer
    out = proc("What is written?", [Image.new("RGB", (90, 40), (200, 10, 10))])
    ids = out["input_ids"][0].tolist()
    assert out["pixel_values"].shape == (1, 3, 84, 84)
    assert ids[:4] == [tok.gmask_id, tok.sop_id, tok.user_id, *tok.encode("\n")]
    assert ids[4:7] == [tok.boi_id, tok.eot_id, tok.eoi_id] and ids[-1] == tok.assistant_id
    assert ids[7:-1] == tok.encode("What is written?")
    assert base.model.generation_eos == tok.stop_ids == (tok.eot_id, tok.user_id, tok.special_tokens["<|observation|>"])
    with pytest.raises(ValueError, match="one image per conversation"):
        proc("Which?", [Image.new("RGB", (9, 9))] * 2)
    ad = registry.get("glm4v")
    assert ad.prompt("MME", {"question": "Is it red? Please answer yes or no."}).endswith("yes or no.\nShort Answer.")
    assert ad.prompt("TextVQA_VAL", {"question": "Q?"}) == "Q?\nAnswer the question using a single word or phrase."
    assert ad.prompt("OCRBench", {"question": "Q?"}) == "Q?"


def test_generate_matches_full_forward_and_left_padding(base):
    model = base.model
    bs = batches(base, n=2, seed=2)
    with torch.no_grad():
        gens = [model.generate(**b, max_new_tokens=4, eos_token_id=[-1]) for b in bs]
        for b, g in zip(bs, gens):
            full = model(input_ids=g[:, :-1], pixel_values=b["pixel_values"]).logits
            assert torch.equal(full[0, -4:].argmax(-1), g[0, -4:])
        # the two prompts in one batch, the shorter padded on the left: the same answers
        L = max(b["input_ids"].shape[1] for b in bs)
        pad = model.pad_token_id
        ids = torch.stack([F.pad(b["input_ids"][0], (L - b["input_ids"].shape[1], 0), value=pad) for b in bs])
        mask = torch.stack([F.pad(b["attention_mask"][0], (L - b["attention_mask"].shape[1], 0)) for b in bs])
        pix = torch.cat([b["pixel_values"] for b in bs])
        together = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pix, max_new_tokens=4,
                                  eos_token_id=[-1])
    assert all(torch.equal(together[i, L:], g[0, -4:]) for i, g in enumerate(gens))
    with pytest.raises(ValueError, match="pads on the left only"):
        model(input_ids=ids, attention_mask=mask.flip(1), pixel_values=pix)


# ---------------------------------------------------------------------------------------------
# rotation, AIFS, MSQ
# ---------------------------------------------------------------------------------------------
def _rotated(ld, inputs=True):
    rot = fresh(ld)
    cfg = QuantConfig()
    r = cfg.rotation
    r.rotate = r.visual = r.visual_cross_attn = r.llm = r.online_visual_hadamard = r.online_llm_hadamard = True
    r.online_visual_input_hadamard = r.online_llm_input_hadamard = inputs
    return rot, pipeline.run(cfg, registry.get("glm4v"), rot, [], [])


def test_rotation_keeps_logits_including_the_towers_online_sites(base):
    bs = batches(base)
    ref = logits(base.model, bs)
    rot, report = _rotated(base)
    assert rel(logits(rot.model, bs), ref) <= 1e-4
    vis, llm = report.rotation["visual"], report.rotation["llm"]
    assert vis["residual"] is False and llm["residual"] is True
    assert [p.rsplit(".", 2)[-2:] for p in vis["online_input_hadamard"][:2]] == [["attention", "query_key_value"],
                                                                                  ["mlp", "fc1"]]
    assert len(vis["online_hadamard"]) == 2 and len(llm["online_input_hadamard"]) == 4
    t = rot.model.transformer
    # the tower keeps its LayerNorms (nothing could absorb them); the LLM's became weightless RMSNorms
    assert isinstance(t.vision.transformer.layers[0].input_layernorm, torch.nn.LayerNorm)
    assert isinstance(t.encoder.layers[0].input_layernorm, ru.RMSNorm)
    # each rotation is real: the tower's V rows, the GLU's output rows and boi changed
    sd, sd0 = rot.model.state_dict(), base.model.state_dict()
    for k in ("transformer.vision.boi", "transformer.vision.transformer.layers.0.attention.query_key_value.bias",
              "transformer.vision.linear_proj.dense_4h_to_h.weight"):
        assert not torch.allclose(sd[k], sd0[k])


def _with(monkeypatch, name, change):
    made = getattr(glm_adapter, name)
    monkeypatch.setattr(glm_adapter, name, lambda m: change(made(m)))


def test_rotation_negative_controls(base, monkeypatch):
    """The declarations the rotation relies on all matter: the LLM's blocked qkv with 2 KV groups, boi / eoi as
    writers of the LLM stream, the tower's norms on the branch outputs, and each online transform at run time."""
    bs = batches(base, n=1)
    ref = logits(base.model, bs)

    def grouped(s):
        return dataclasses.replace(s, block=dataclasses.replace(s.block, attn=dataclasses.replace(
            s.block.attn, qkv_layout="grouped")))

    _with(monkeypatch, "llm_stack", grouped)
    assert rel(logits(_rotated(base, inputs=False)[0].model, bs), ref) > 1e-3
    monkeypatch.undo()
    _with(monkeypatch, "llm_stack", lambda s: dataclasses.replace(s, writers=s.writers[:2]))
    assert rel(logits(_rotated(base, inputs=False)[0].model, bs), ref) > 1e-3
    monkeypatch.undo()
    # declared pre-norm, the tower's norms get fused into qkv / fc1 and the stream rotated: wrong
    _with(monkeypatch, "vision_stack", lambda s: dataclasses.replace(s, branch_output_norms=False))
    assert rel(logits(_rotated(base, inputs=False)[0].model, bs), ref) > 1e-3
    monkeypatch.undo()
    rot, _ = _rotated(base)
    for path in ("transformer.vision.transformer.layers.0.attention.query_key_value",
                 "transformer.vision.transformer.layers.1.mlp.fc1", "transformer.vision.transformer.layers.0.mlp.fc2"):
        layer = rot.model.get_submodule(path)
        layer.use_online_rotation = False
        assert rel(logits(rot.model, bs), ref) > 1e-3, path
        layer.use_online_rotation = True
    assert rel(logits(rot.model, bs), ref) <= 1e-4


def test_residual_rotation_of_a_post_norm_stack_is_refused(base):
    model = fresh(base).model
    stack = glm_adapter.vision_stack(model)
    assert not stack.residual_rotation
    Q = ru.rotation_matrix(stack.hidden_size)
    for call in (lambda: ru.rotate_stack(model, stack, Q), lambda: ru.fuse_norms(model, stack),
                 lambda: ru.bake_mean_out(model, stack)):
        with pytest.raises(ValueError, match=r"visual: cannot .*norms of this stack sit on the branch outputs.*"
                                             r"per-head V/O Hadamard and online Hadamards"):
            call()
    ru.make_rotation_ready(model, stack)  # leaves the norms alone
    assert isinstance(model.transformer.vision.transformer.layers[0].post_attention_layernorm, torch.nn.LayerNorm)
    assert torch.equal(model.state_dict()["transformer.vision.transformer.layers.0.input_layernorm.weight"],
                       base.model.state_dict()["transformer.vision.transformer.layers.0.input_layernorm.weight"])


def test_aifs_is_invariant_with_the_shared_image_position(base, monkeypatch):
    aifs_calls = count_aifs_attention(monkeypatch)
    sw = fresh(base)
    pipeline.rebuild(QuantConfig(aifs=True), registry.get("glm4v"), sw)
    bs = batches(base, n=2, seed=7)
    seen = {}

    def grab(mod, args, kwargs):
        seen.setdefault("cos", kwargs["position_embeddings"][0])

    h = sw.model.transformer.encoder.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    out = logits(sw.model, bs)
    h.remove()
    assert torch.allclose(out, logits(base.model, bs), atol=1e-5, rtol=0)
    assert aifs_calls  # the prefill ran attention in the original order
    # the features moved to the front and kept their one shared position (b + 1 = 5)
    n = base.model.image_tokens
    cos = seen["cos"][0]
    assert torch.equal(cos[:n], cos[:1].expand(n, -1)) and not torch.equal(cos[n], cos[0])
    with torch.no_grad():
        g0 = base.model.generate(**bs[0], max_new_tokens=5, eos_token_id=[-1])
        g1 = sw.model.generate(**bs[0], max_new_tokens=5, eos_token_id=[-1])
    assert g0.shape[1] == bs[0]["input_ids"].shape[1] + 5 and torch.equal(g0, g1)


def test_msq_scales_do_not_depend_on_aifs(base):
    bs = batches(base, n=2, seed=5)

    def calibrated(aifs):
        ld = fresh(base)
        cfg = QuantConfig(aifs=aifs)
        cfg.llm.quantize = cfg.llm.act.static = True
        cfg.llm.act.bits, cfg.llm.weight.rtn = 8, True
        pipeline.run(cfg, registry.get("glm4v"), ld, bs, bs)
        return {n: m.input_quantizer.scale.clone() for n, m in ld.model.named_modules()
                if getattr(m, "input_quantizer", None) is not None and n.startswith("transformer.encoder.")}

    on, off = calibrated(True), calibrated(False)
    assert set(on) == set(off) and len(on) == 2 * 4
    assert all(v.numel() == 2 for v in on.values())          # a visual and a text scale per activation
    assert all(torch.allclose(on[k], off[k], rtol=1e-5) for k in on)
