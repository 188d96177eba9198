import torch

from fake_quant import pipeline
from fake_quant.config import QuantConfig
from fake_quant.quant_utils import QuantLinear
from model.base import Loaded
from model.registry import get


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=80, intermediate_size=160, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=300, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def test_text_only_lm_rotates_exactly_and_quantizes():
    ad = get("causal_lm")
    ids = [{"input_ids": torch.randint(3, 300, (1, 24), generator=torch.Generator().manual_seed(i))} for i in range(4)]
    model = tiny_llama()
    with torch.no_grad():
        ref = model(**ids[0]).logits
    cfg = QuantConfig(msq=False)
    r = cfg.rotation
    r.rotate = r.llm = r.online_llm_hadamard = True
    loaded = Loaded(model, None, "tiny")
    pipeline.run(cfg, ad, loaded, [], [])
    with torch.no_grad():
        assert float((model(**ids[0]).logits - ref).abs().max() / ref.abs().max()) <= 1e-4
    cfg.llm.quantize, cfg.llm.weight.bits, cfg.llm.act.bits, cfg.llm.act.static = True, 4, 8, True
    cfg.nsamples = cfg.calib_num = 4
    q = Loaded(tiny_llama(), None, "tiny")
    pipeline.run(cfg, ad, q, ids, ids)
    qls = [m for m in q.model.modules() if isinstance(m, QuantLinear)]
    assert len(qls) == 14 and all(m.weight_quantized and m.input_quantizer.is_frozen for m in qls)
