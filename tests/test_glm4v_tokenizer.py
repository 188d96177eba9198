"""The GLM-4V tokenizer without remote code: special tokens round-trip, the split pattern, ids read from
tokenizer_config.json, the reply cut at the stop ids; and, with MQUANT_GLM4V_TOKENIZER naming a real glm-4v-9b
folder, the real file's ids."""
import base64
import json
import os

import pytest

from model.glm4v.tiny import write_tokenizer
from model.qwenvl.tokenizer import gpt2_byte_order
from model.glm4v.tokenizer import SPECIAL_TOKENS, GLM4Tokenizer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok"))
    write_tokenizer(path)
    return path


def test_special_tokens_round_trip(folder):
    tok = GLM4Tokenizer(folder)
    assert [tok.special_tokens[t] for t in SPECIAL_TOKENS] == list(range(tok.n_ranks, tok.n_ranks + 14))
    for t in SPECIAL_TOKENS:
        i = tok.special_tokens[t]
        assert tok.decode([i]) == t and tok.encode(t, allow_special=True) == [i]
        plain = tok.encode(t)  # chat text: the special's spelling is ordinary text
        assert all(x < tok.n_ranks for x in plain) and tok.decode(plain) == t
        assert tok.decode([i], skip_special_tokens=True) == ""
    text = "[gMASK]<sop><|user|>\nWhat is 12345?<|begin_of_image|><|endoftext|><|end_of_image|> ok<|assistant|>"
    ids = tok.encode(text, allow_special=True)
    assert tok.decode(ids) == text and ids[:3] == [tok.gmask_id, tok.sop_id, tok.user_id]
    assert ids.count(tok.boi_id) == 1 and ids.index(tok.eoi_id) == ids.index(tok.boi_id) + 2
    assert tok.decode(tok.encode("naïve café 東京")) == "naïve café 東京"


def test_digits_are_split_in_runs_of_three(tmp_path):
    """With merges for "12", "123" and "1234" in the ranks, the split pattern alone decides: runs of up to three
    digits give [123, 4]; Qwen's one-digit pattern would give four ids, an unbounded one the single "1234"."""
    ranks = [bytes([b]) for b in gpt2_byte_order()] + [b"12", b"123", b"1234"]
    (tmp_path / "tokenizer.model").write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks)))
    tok = GLM4Tokenizer(str(tmp_path))
    assert tok.encode("1234") == [257, tok.encode("4")[0]] and tok.encode("12") == [256]
    assert tok.encode("x1234567") == tok.encode("x") + [257] + tok.encode("456") + tok.encode("7")


def test_reply_stops_at_the_eos_ids(folder):
    tok = GLM4Tokenizer(folder)
    body = tok.encode(" red square ")
    for stop in tok.stop_ids:
        assert tok.decode_response(body + [stop] + tok.encode("more")) == "red square"
    assert len(tok.stop_ids) == 3 and tok.stop_ids[0] == tok.eot_id
    with pytest.raises(ValueError, match="neither a BPE rank"):
        tok.decode([len(tok) + 5])
    assert tok.decode(body + [len(tok) + 5], skip_special_tokens=True) == " red square "  # padding rows


def test_added_token_ids_come_from_tokenizer_config(folder, tmp_path):
    cfg = json.load(open(os.path.join(folder, "tokenizer_config.json")))
    n = GLM4Tokenizer(folder).n_ranks
    # a checkpoint whose added tokens sit elsewhere: the file's ids win over the default order
    moved = {str(n + 20 + i): {**v, "content": v["content"]} for i, v in enumerate(cfg["added_tokens_decoder"].values())}
    os.makedirs(tmp_path / "m")
    os.link(os.path.join(folder, "tokenizer.model"), tmp_path / "m" / "tokenizer.model")
    json.dump({**cfg, "added_tokens_decoder": moved}, open(tmp_path / "m" / "tokenizer_config.json", "w"))
    tok = GLM4Tokenizer(str(tmp_path / "m"))
    assert tok.eot_id == n + 20 and tok.decode([n + 20 + 10]) == "<|begin_of_image|>" and len(tok) == n + 34
    del moved[next(k for k, v in moved.items() if v["content"] == "<|user|>")]
    json.dump({**cfg, "added_tokens_decoder": moved}, open(tmp_path / "m" / "tokenizer_config.json", "w"))
    with pytest.raises(ValueError, match="lacks <\\|user\\|>"):
        GLM4Tokenizer(str(tmp_path / "m"))
    os.remove(tmp_path / "m" / "tokenizer_config.json")  # no config: the ids follow the ranks in the original order
    assert GLM4Tokenizer(str(tmp_path / "m")).eot_id == n


REAL = os.environ.get("MQUANT_GLM4V_TOKENIZER")


@pytest.mark.skipif(not REAL, reason="set MQUANT_GLM4V_TOKENIZER to a glm-4v-9b folder (tokenizer.model and "
                                     "tokenizer_config.json)")
def test_the_real_tokenizer_ids():
    tok = GLM4Tokenizer(REAL)
    assert tok.n_ranks == 151329 and tok.eot_id == 151329 and tok.stop_ids == (151329, 151336, 151338)
    assert (tok.gmask_id, tok.sop_id, tok.user_id, tok.assistant_id, tok.boi_id, tok.eoi_id) == (
        151331, 151333, 151336, 151337, 151339, 151340)
    assert tok.encode("\n") == [198]
    assert tok.chat_ids("Hi")[:7] == [151331, 151333, 151336, 198, 151339, 151329, 151340]
