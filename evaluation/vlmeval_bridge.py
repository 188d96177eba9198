"""Run and score a (quantized) model with VLMEvalKit itself, for users who have it installed.

VLMEvalKit (import name ``vlmeval``; PyPI ``ms-vlmeval``) pulls in its own CUDA torch and
torchvision, so it is not a dependency of this project: install it in a separate environment
(``third/README.md``) and pass ``--eval_backend vlmeval``. Its dataset classes then load the TSV
from ``--data_root`` (exported as ``$LMUData``), build the prompts, and score with their own code
-- including the LLM judge for MME answers that are neither yes nor no, if one is configured.

Rows held out for calibration are removed from VLMEvalKit's dataset before inference, so they
are never scored by either backend.
"""
from __future__ import annotations

import os

from model.base import Sample


def require_vlmeval():
    try:
        import vlmeval  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            "--eval_backend vlmeval needs VLMEvalKit importable as `vlmeval`; it is not part of this "
            "environment (it brings its own CUDA torch): see third/README.md, or use the default "
            "--eval_backend mquant, which scores the same way without it"
        ) from e


def vlm_class():
    """A ``vlmeval.vlm.base.BaseModel`` subclass wrapping an adapter and a loaded model."""
    require_vlmeval()
    from PIL import Image
    from vlmeval.vlm.base import BaseModel

    class MQuantVLM(BaseModel):
        INTERLEAVE = False

        def __init__(self, adapter=None, loaded=None, device: str = "cpu", max_new_tokens: int = 128, **kwargs):
            super().__init__()
            self.adapter, self.loaded, self.device, self.max_new_tokens = adapter, loaded, device, max_new_tokens

        def use_custom_prompt(self, dataset):
            return False  # the dataset class builds the question; the adapter applies the chat template

        def generate_inner(self, message, dataset=None):
            images = [Image.open(m["value"]).convert("RGB") for m in message if m["type"] == "image"]
            text = "\n".join(m["value"] for m in message if m["type"] == "text")
            sample = Sample(images, text, meta={"dataset": dataset})
            inputs = self.adapter.build_inputs(self.loaded, sample, self.device)
            out = self.loaded.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                             **self.adapter.generate_kwargs(self.loaded))
            return self.adapter.decode(self.loaded, out[:, inputs["input_ids"].shape[1]:]).strip()

    return MQuantVLM


def register(name: str, model) -> None:
    """Make ``model`` available to VLMEvalKit's ``run.py`` under ``name``."""
    from vlmeval.config import supported_VLM

    supported_VLM[name] = lambda **kwargs: model


def evaluate(adapter, loaded, dataset_name: str, output_dir: str, device: str, max_new_tokens: int,
             data_root: str, exclude_indices: list[str], model_name: str = "MQuant") -> dict:
    os.environ["LMUData"] = os.path.abspath(data_root)
    require_vlmeval()
    from vlmeval.dataset import build_dataset
    from vlmeval.inference import infer_data_job

    model = vlm_class()(adapter=adapter, loaded=loaded, device=device, max_new_tokens=max_new_tokens)
    register(model_name, model)
    dataset = build_dataset(dataset_name)
    held = {str(i) for i in exclude_indices}
    dataset.data = dataset.data[~dataset.data["index"].astype(str).isin(held)].reset_index(drop=True)
    model.set_dump_image(dataset.dump_image)
    os.makedirs(output_dir, exist_ok=True)
    infer_data_job(model, work_dir=output_dir, model_name=model_name, dataset=dataset)
    try:
        from vlmeval.smp import get_pred_file_path

        result_file = get_pred_file_path(output_dir, model_name, dataset_name)
    except ImportError:  # older VLMEvalKit
        result_file = os.path.join(output_dir, f"{model_name}_{dataset_name}.xlsx")
    scores = dataset.evaluate(result_file)
    if hasattr(scores, "to_dict"):  # a one-row DataFrame
        scores = {k: (v[0] if isinstance(v, dict) and 0 in v else v) for k, v in scores.to_dict().items()}
    return {"dataset": dataset_name, "backend": "vlmeval", "scores": scores, "rows_scored": len(dataset.data),
            "predictions_file": result_file}
