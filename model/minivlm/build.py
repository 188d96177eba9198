"""Assemble MiniVLM: the converted DINOv2 ViT-S/14 tower, a 2-layer MLP projector and SmolLM2-135M-Instruct, in
the LLaVA layout (``LlavaForConditionalGeneration``), with its processor.

Images are 112 x 112 (8 x 8 = 64 patch tokens; the tower interpolates its position table), the projector reads
the tower's last hidden state without the class token, and an ``<image>`` token is added to the tokenizer. Only
the projector is trained (``model.minivlm.train``); the tower and the LM keep their converted weights.
"""
from __future__ import annotations

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
PROJECTOR_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "projector.safetensors")


def build_processor(lm_dir: str):
    from transformers import AutoTokenizer, BitImageProcessor, LlavaProcessor

    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_processor = BitImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                        do_center_crop=True, do_convert_rgb=True, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                          vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


def build(cache: str | None = None, projector: str | None = PROJECTOR_FILE, seed: int = 0):
    """(model, processor). ``projector``: a trained projector's safetensors (None: freshly initialized, seeded)."""
    from transformers import AutoModelForCausalLM, Dinov2Model, LlavaConfig, LlavaForConditionalGeneration

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
                      vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu",
                      tie_word_embeddings=lm.config.tie_word_embeddings)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    model.model.vision_tower.load_state_dict(vit.state_dict())
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    if lm.config.tie_word_embeddings:
        model.tie_weights()
    if projector is not None:
        if not os.path.isfile(projector):
            raise FileNotFoundError(f"{projector} not found: train the projector with `python -m model.minivlm.train`")
        from safetensors.torch import load_file

        model.model.multi_modal_projector.load_state_dict(load_file(projector))
    return model.float().eval(), processor
