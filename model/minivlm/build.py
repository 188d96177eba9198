"""Assemble MiniVLM: the converted DINOv2 ViT-S/14 tower, a 2-layer MLP projector and SmolLM2-135M-Instruct, in
the LLaVA layout (``LlavaForConditionalGeneration``), with its processor.

Images are 112 x 112 (8 x 8 = 64 patch tokens; the tower interpolates its position table). The projector reads
one or several hidden states of the tower (``vision_feature_layer``, concatenated, class token dropped), and an
``<image>`` token is added to the tokenizer. What ``model.minivlm.train`` learned lives in one safetensors file:
the projector, and optionally low-rank deltas of the LM's linears that are merged into the converted weights
here, so the model the pipeline sees is a plain ``LlavaForConditionalGeneration``. The file's metadata names the
feature layers and the delta scale; the tower is never trained.
"""
from __future__ import annotations

import json
import os

import torch

from .convert import convert_all, default_cache

IMAGE_SIZE = 112
IMAGE_TOKEN = "<image>"
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# ChatML like SmolLM2's own template, with each image shown as the image token
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TRAINED_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "trained.safetensors")
PROJECTOR_PREFIX, DELTA_PREFIX = "projector.", "lm_delta."


def build_processor(lm_dir: str):
    from transformers import AutoTokenizer, BitImageProcessor, LlavaProcessor

    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_processor = BitImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                        do_center_crop=True, do_convert_rgb=True, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                          vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


def read_trained(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a trained file; the metadata's ``vision_feature_layer`` is an int or a list."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: train MiniVLM with `python -m model.minivlm.train`")
    with safe_open(path, "pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if "vision_feature_layer" not in meta:
        raise ValueError(f"{path} has no 'vision_feature_layer' in its metadata: it is not a file written by "
                         "`python -m model.minivlm.train`")
    meta["vision_feature_layer"] = json.loads(meta["vision_feature_layer"])
    meta["delta_scale"] = float(meta.get("delta_scale", 0.0))
    return tensors, meta


@torch.no_grad()
def merge_lm_deltas(lm: torch.nn.Module, tensors: dict[str, torch.Tensor], scale: float) -> int:
    """W += scale * B @ A for every ``lm_delta.<module>.A`` / ``.B`` pair (module paths relative to the decoder);
    returns how many linears changed. A path that names no linear of ``lm`` is an error."""
    names = sorted({k[len(DELTA_PREFIX):].rsplit(".", 1)[0] for k in tensors if k.startswith(DELTA_PREFIX)})
    for name in names:
        try:
            lin = lm.get_submodule(name)
        except AttributeError:
            raise ValueError(f"trained file: LM delta for {name!r}, which is not a module of the language model") from None
        a, b = tensors[f"{DELTA_PREFIX}{name}.A"].double(), tensors[f"{DELTA_PREFIX}{name}.B"].double()
        if (b.shape[0], a.shape[1]) != tuple(lin.weight.shape):
            raise ValueError(f"trained file: LM delta for {name} is {b.shape[0]}x{a.shape[1]}, the weight is "
                             f"{tuple(lin.weight.shape)}")
        lin.weight.copy_((lin.weight.double() + scale * (b @ a)).to(lin.weight.dtype))
    return len(names)


def build(cache: str | None = None, trained: str | None = TRAINED_FILE, seed: int = 0,
          feature_layers: int | list[int] = -1):
    """(model, processor). ``trained``: the file ``model.minivlm.train`` wrote (its feature layers win over
    ``feature_layers``); None: a freshly initialized, seeded projector reading ``feature_layers``."""
    from transformers import AutoModelForCausalLM, Dinov2Model, LlavaConfig, LlavaForConditionalGeneration

    tensors, meta = read_trained(trained) if trained is not None else ({}, {"vision_feature_layer": feature_layers})
    paths = convert_all(cache or default_cache())
    processor = build_processor(paths["lm"])
    vit = Dinov2Model.from_pretrained(paths["vit"])
    lm = AutoModelForCausalLM.from_pretrained(paths["lm"])
    image_token_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    old_rows = lm.get_input_embeddings().weight.shape[0]
    lm.resize_token_embeddings(len(processor.tokenizer), mean_resizing=False)
    with torch.no_grad():  # the image token's row (only its tied output logit is ever used): deterministic
        emb = lm.get_input_embeddings().weight
        emb[old_rows:] = emb[:old_rows].mean(0)
    cfg = LlavaConfig(vision_config=vit.config, text_config=lm.config, image_token_id=image_token_id,
                      vision_feature_layer=meta["vision_feature_layer"], vision_feature_select_strategy="default",
                      projector_hidden_act="gelu", tie_word_embeddings=lm.config.tie_word_embeddings)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    model.model.vision_tower.load_state_dict(vit.state_dict())
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    if lm.config.tie_word_embeddings:
        model.tie_weights()
    if trained is not None:
        proj = {k[len(PROJECTOR_PREFIX):]: v for k, v in tensors.items() if k.startswith(PROJECTOR_PREFIX)}
        model.model.multi_modal_projector.load_state_dict(proj)
        merge_lm_deltas(model.model.language_model, tensors, meta["delta_scale"])
    return model.float().eval(), processor
