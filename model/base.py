"""The adapter contract: the one place where a model family is named.

An adapter describes a family as data (:class:`~fake_quant.spec.StackSpec` layouts and the ordered
GPTQ segments) plus a few hooks (loading, building inputs from images and text, finding the visual
token positions). The pipeline only talks to this interface.
"""
from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from fake_quant.spec import AttentionSite, StackSpec


@dataclass
class Sample:
    """One item to calibrate on or to answer: images and a question (and, for scoring, an answer)."""

    images: list  # PIL images
    question: str
    answer: Any = None
    index: Any = None
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Segment:
    """Modules run one after another, each one's output hidden state being the next one's input;
    GPTQ captures the first module's inputs once and propagates them through the segment.
    ``part`` is the quantization part ("visual", "connector" or "llm") its linears belong to."""

    part: str
    modules: tuple[str, ...]


@dataclass
class Loaded:
    model: nn.Module
    processor: Any
    path: str
    offloader: Any = None  # set when blocks are streamed from the CPU (--offload)
    modality_state: Any = None  # set when MSQ or AIFS track visual tokens
    generation: dict = field(default_factory=dict)  # decoding settings over the family's (e.g. --greedy)


class ModelAdapter(ABC):
    name: ClassVar[str]
    architectures: ClassVar[tuple[str, ...]] = ()  # config.json "architectures" this adapter serves
    siblings: ClassVar[tuple[str, ...]] = ()       # families the same script may hand a checkpoint to
    builtin_models: ClassVar[tuple[str, ...]] = ("tiny",)  # --model_path names built here instead of loaded
    # the checkpoint folder under weights/ that --model_path defaults to (the reference repo's layout);
    # None: the script needs --model_path
    default_checkpoint: ClassVar[str | None] = None

    # -- loading --------------------------------------------------------------------------------
    @abstractmethod
    def load(self, model_path: str, device: str, dtype: torch.dtype) -> Loaded: ...

    @classmethod
    def matches(cls, config: dict) -> bool:
        return any(a in cls.architectures for a in config.get("architectures", []) or [])

    # -- layout ---------------------------------------------------------------------------------
    @abstractmethod
    def stacks(self, model: nn.Module) -> list[StackSpec]:
        """Residual-stream layouts (vision encoder, LLM) for norm fusion and rotation."""

    @abstractmethod
    def segments(self, model: nn.Module) -> list[Segment]:
        """Ordered GPTQ segments: vision blocks, connector, LLM layers."""

    def attention_sites(self, model: nn.Module) -> list[AttentionSite]:
        """Attention layers outside the stacks (a connector's cross-attention) for the per-head V/O Hadamard."""
        return []

    # -- inputs ---------------------------------------------------------------------------------
    def build_inputs(self, loaded: Loaded, sample: Sample, device: str) -> dict:
        """Model inputs (a batch of one) for a sample, ending where the answer starts: the images
        first, then the question, through the processor's chat template."""
        content = [{"type": "image"} for _ in sample.images] + [{"type": "text", "text": sample.question}]
        proc = loaded.processor
        prompt = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                          tokenize=False)
        inputs = proc(text=[prompt], images=list(sample.images) or None, return_tensors="pt",
                      **self.processor_kwargs(loaded, sample))
        inputs = self.complete_inputs(loaded, dict(inputs))
        return to_device(loaded, inputs, device)

    def processor_kwargs(self, loaded: Loaded, sample: Sample) -> dict:
        """Extra processor arguments for a sample (e.g. a dataset's image size)."""
        return {}

    def complete_inputs(self, loaded: Loaded, inputs: dict) -> dict:
        """Add what the model needs and the processor did not return."""
        return inputs

    @abstractmethod
    def visual_token_mask(self, loaded: Loaded, inputs: dict) -> torch.Tensor:
        """Bool ``[batch, seq]``: which LLM input positions hold visual tokens."""

    def prompt(self, dataset_name: str, row: dict) -> str:
        """The question text for a benchmark row (the chat template is applied by build_inputs)."""
        from evaluation.eval import dataset_prompt

        return dataset_prompt(dataset_name, row)

    def decode(self, loaded: Loaded, token_ids: torch.Tensor) -> str:
        return loaded.processor.batch_decode(token_ids, skip_special_tokens=True)[0]

    def generate_kwargs(self, loaded: Loaded) -> dict:
        """The family's evaluation decoding (VLMEvalKit's), beyond greedy."""
        return {}

    def decoding(self, loaded: Loaded) -> dict:
        """What ``generate`` gets for evaluation: the family's settings, overridden by ``loaded.generation``."""
        return {**self.generate_kwargs(loaded), **loaded.generation}


def to_device(loaded: Loaded, inputs: dict, device: str) -> dict:
    """Model inputs on ``device``; pixels also in the model's dtype (ids and masks keep theirs)."""
    dtype = next(loaded.model.parameters()).dtype
    return {k: (v.to(device, dtype) if k == "pixel_values" else v.to(device)) for k, v in inputs.items()}


def read_config(model_path: str) -> dict:
    """config.json of a local checkpoint folder, with errors that say what is missing."""
    if not os.path.isdir(model_path):
        raise FileNotFoundError(
            f"--model_path {model_path!r} is not a folder: give the local folder of a downloaded "
            "checkpoint (the one with config.json and *.safetensors), or 'tiny' for the built-in tiny model"
        )
    cfg_file = os.path.join(model_path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(
            f"{model_path!r} has no config.json: --model_path must point at the checkpoint folder itself"
        )
    with open(cfg_file) as f:
        return json.load(f)
