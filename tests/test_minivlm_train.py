"""MiniVLM's trained LM deltas: what training runs (low-rank modules beside the frozen linears) and what build()
loads (the deltas merged into the weights) are the same model; bad trained files are refused by name."""
import pytest
import torch
from safetensors.torch import save_file

from model.minivlm.build import DELTA_PREFIX, merge_lm_deltas, read_trained
from model.minivlm.train import DELTA_TARGETS, add_deltas, calibration_samples


def tiny_decoder(seed=0):
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64)
    return LlamaModel(cfg).eval()


def test_merged_deltas_equal_the_training_modules():
    train_lm, merged_lm = tiny_decoder(), tiny_decoder()
    deltas = add_deltas(train_lm, rank=3, scale=2.0, seed=1)
    assert len(deltas) == 2 * len(DELTA_TARGETS)
    with torch.no_grad():
        for d in deltas.values():
            d.B.normal_(std=0.05)  # as after some training steps (B starts at zero)
    ids = torch.randint(0, 64, (2, 11))
    with torch.no_grad():
        trained = train_lm(input_ids=ids).last_hidden_state
        before = merged_lm(input_ids=ids).last_hidden_state
    tensors = {}
    for name, d in deltas.items():
        tensors[f"{DELTA_PREFIX}{name}.A"], tensors[f"{DELTA_PREFIX}{name}.B"] = d.A.detach(), d.B.detach()
    assert merge_lm_deltas(merged_lm, tensors, 2.0) == 2 * len(DELTA_TARGETS)
    with torch.no_grad():
        after = merged_lm(input_ids=ids).last_hidden_state
    assert float((trained - before).abs().max()) > 1e-2  # the deltas matter ...
    torch.testing.assert_close(after, trained, rtol=1e-4, atol=1e-5)  # ... and merging keeps them exactly


def test_a_delta_for_a_missing_module_or_of_the_wrong_shape_is_refused():
    lm = tiny_decoder()
    with pytest.raises(ValueError, match="'layers.7.mlp.up_proj', which is not a module"):
        merge_lm_deltas(lm, {f"{DELTA_PREFIX}layers.7.mlp.up_proj.A": torch.zeros(2, 48),
                             f"{DELTA_PREFIX}layers.7.mlp.up_proj.B": torch.zeros(96, 2)}, 1.0)
    with pytest.raises(ValueError, match=r"layers.0.mlp.up_proj is 48x48, the weight is \(96, 48\)"):
        merge_lm_deltas(lm, {f"{DELTA_PREFIX}layers.0.mlp.up_proj.A": torch.zeros(2, 48),
                             f"{DELTA_PREFIX}layers.0.mlp.up_proj.B": torch.zeros(48, 2)}, 1.0)


def test_trained_file_metadata(tmp_path):
    bare = tmp_path / "bare.safetensors"
    save_file({"projector.linear_1.weight": torch.zeros(2, 2)}, str(bare))
    with pytest.raises(ValueError, match="no 'vision_feature_layer' in its metadata"):
        read_trained(str(bare))
    with pytest.raises(FileNotFoundError, match="python -m model.minivlm.train"):
        read_trained(str(tmp_path / "absent.safetensors"))
    good = tmp_path / "good.safetensors"
    save_file({"projector.linear_1.weight": torch.zeros(2, 2)}, str(good),
              metadata={"vision_feature_layer": "[4, 8, 12]", "delta_scale": "2.0"})
    _, meta = read_trained(str(good))
    assert meta["vision_feature_layer"] == [4, 8, 12] and meta["delta_scale"] == 2.0


def test_calibration_samples_are_prompted_and_answered_as_the_benchmark():
    from evaluation.eval import VQA_SUFFIX

    s = calibration_samples()
    assert {k: len(v) for k, v in s.items()} == {"SynthBench_OCR": 64, "SynthBench_VQA": 64, "SynthBench_YN": 64}
    # reading and VQA ask for one word; VQA's counts are answered with the digit, the first of the references
    assert all(r["question"].endswith(VQA_SUFFIX) for r in s["SynthBench_OCR"] + s["SynthBench_VQA"])
    counts = [r["answer"] for r in s["SynthBench_VQA"] if r["question"].startswith("How many")]
    assert counts and set(counts) <= {"1", "2", "3", "4"}
    assert {r["answer"] for r in s["SynthBench_YN"]} == {"Yes", "No"}
    assert all(r["image"].size == (112, 112) for v in s.values() for r in v)
