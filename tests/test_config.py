import pytest

from fake_quant.config import QuantConfig


def w4a8():
    c = QuantConfig()
    for p in c.parts():
        p.quantize = True
        p.weight.bits, p.act.bits, p.act.static = 4, 8, True
    return c


def test_valid_config_passes_and_serializes():
    c = w4a8().validate()
    d = c.to_dict()
    assert d["llm"]["weight"]["bits"] == 4 and d["visual"]["act"]["static"] is True


@pytest.mark.parametrize(
    "mutate,flags",
    [
        (lambda c: setattr(c.llm.act, "bits", 1), ["--llm_a_bits"]),
        (lambda c: setattr(c.visual.weight, "bits", 17), ["--visual_w_bits"]),
        (lambda c: setattr(c.llm.act, "group_size", 128), ["--llm_static", "--a_groupsize"]),
        (lambda c: (setattr(c.gptq, "act_order", True), setattr(c.llm.weight, "rtn", True)),
         ["--act_order", "--llm_w_rtn"]),
        (lambda c: setattr(c.llm.act, "clip_ratio", 1.5), ["--a_clip_ratio"]),
        (lambda c: setattr(c.gptq, "percdamp", 0.0), ["--percdamp"]),
        (lambda c: setattr(c.rotation, "mode", "givens"), ["--rotate_mode"]),
        (lambda c: setattr(c.rotation, "hadamard_fallback", "zero"), ["--hadamard_fallback"]),
        (lambda c: setattr(c.visual.weight, "group_size", 0), ["--w_groupsize"]),
        (lambda c: setattr(c, "calib_num", 0), ["--visual_static", "--calib_num"]),
        (lambda c: setattr(c, "nsamples", 0), ["GPTQ", "--nsamples"]),
        (lambda c: setattr(c.rotation, "online_llm_hadamard", True), ["--online_llm_hadamard", "--rotate_llm"]),
        (lambda c: (setattr(c.rotation, "rotate", True), setattr(c.rotation, "visual", True),
                    setattr(c.rms, "visual", True)), ["--visual_split", "--online_visual_hadamard"]),
        (lambda c: setattr(c.rotation, "llm", True), ["--rotate_llm", "--rotate"]),
        (lambda c: setattr(c.llm.act, "bits", 16), ["--llm_static", "--llm_a_bits"]),
        (lambda c: (setattr(c.llm.act, "static", False), setattr(c.llm.act, "per_tensor", True),
                    setattr(c.llm.act, "group_size", 64)), ["--act_per_tensor", "--a_groupsize"]),
    ],
)
def test_bad_configs_name_the_flags(mutate, flags):
    c = w4a8()
    mutate(c)
    with pytest.raises(ValueError) as e:
        c.validate()
    for f in flags:
        assert f in str(e.value)


def test_rtn_needs_no_calibration_but_gptq_does():
    c = QuantConfig(nsamples=0)
    c.llm.quantize, c.llm.weight.bits, c.llm.weight.rtn = True, 4, True
    c.validate()
    c.llm.weight.rtn = False
    with pytest.raises(ValueError, match="GPTQ on the llm weights needs calibration data"):
        c.validate()
