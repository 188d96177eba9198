"""Tokenizers of InternVL2 checkpoints, without remote code.

InternLM2 folders ship a SentencePiece ``tokenizer.model`` plus ``tokenizer_config.json``, whose
``added_tokens_decoder`` names the chat and image tokens (``<|im_start|>``, ``<|im_end|>``, ``<img>``,
``</img>``, ``<IMG_CONTEXT>`` ...). :class:`SentencePieceTokenizer` splits the text at those tokens
(longest first), encodes each piece in between with the SentencePiece model, and prepends BOS when
``add_bos_token`` says so -- the behaviour of the original slow tokenizer. Qwen2 folders (InternVL2-1B)
load with transformers' own Qwen2 tokenizer.
"""
from __future__ import annotations

import json
import os
import re


class SentencePieceTokenizer:
    def __init__(self, folder: str) -> None:
        try:
            import sentencepiece as spm
        except ImportError as e:  # pragma: no cover - pinned in requirements.txt
            raise ImportError("InternLM2 tokenizers need the sentencepiece package: pip install sentencepiece") from e
        model_file = os.path.join(folder, "tokenizer.model")
        if not os.path.isfile(model_file):
            raise FileNotFoundError(f"{folder} has no tokenizer.model (the SentencePiece model of the InternLM2 "
                                    "tokenizer); copy it from the original checkpoint")
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        cfg_file = os.path.join(folder, "tokenizer_config.json")
        cfg = json.load(open(cfg_file)) if os.path.isfile(cfg_file) else {}
        self.added: dict[str, int] = {}
        self.special: set[int] = set()
        self.lstrip: set[str] = set()   # added tokens that swallow the whitespace before / after them
        self.rstrip: set[str] = set()
        for tid, tok in (cfg.get("added_tokens_decoder") or {}).items():
            content = tok["content"] if isinstance(tok, dict) else str(tok)
            self.added[content] = int(tid)
            if not isinstance(tok, dict) or tok.get("special", True):
                self.special.add(int(tid))
            if isinstance(tok, dict) and tok.get("lstrip"):
                self.lstrip.add(content)
            if isinstance(tok, dict) and tok.get("rstrip"):
                self.rstrip.add(content)
        self.add_bos = bool(cfg.get("add_bos_token", True))
        self.add_eos = bool(cfg.get("add_eos_token", False))
        self.bos_token_id, self.eos_token_id = self.sp.bos_id(), self.sp.eos_id()
        self.special |= {i for i in (self.bos_token_id, self.eos_token_id, self.sp.pad_id(), self.sp.unk_id()) if i >= 0}
        self.id_to_added = {v: k for k, v in self.added.items()}
        names = sorted(self.added, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(n) for n in names) + ")") if names else None

    def convert_tokens_to_ids(self, token: str) -> int:
        if token in self.added:
            return self.added[token]
        tid = self.sp.piece_to_id(token)
        if tid == self.sp.unk_id() and token != self.sp.id_to_piece(tid):
            raise KeyError(f"token {token!r} is not in the tokenizer")
        return tid

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.bos_token_id] if add_special_tokens and self.add_bos else []
        pieces = self._split.split(text) if self._split else [text]
        for i, piece in enumerate(pieces):  # added tokens sit at odd positions
            if i % 2 == 0 and piece:
                if i > 0 and pieces[i - 1] in self.rstrip:
                    piece = piece.lstrip()
                if i + 1 < len(pieces) and pieces[i + 1] in self.lstrip:
                    piece = piece.rstrip()
            if not piece:
                continue
            if i % 2:
                ids.append(self.added[piece])
            else:
                ids += self.sp.encode(piece)
        if add_special_tokens and self.add_eos:
            ids.append(self.eos_token_id)
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        out, run = [], []

        def flush():
            if run:
                out.append(self.sp.decode(run))
                run.clear()

        for i in (int(t) for t in ids):
            if i in self.special and skip_special_tokens:
                continue
            if i in self.id_to_added:
                flush()
                out.append(self.id_to_added[i])
            elif i < self.sp.get_piece_size():
                run.append(i)
        flush()
        return clean_up_spaces("".join(out))


# the original tokenizer's decoding always ends with transformers' clean-up of spaces before punctuation and
# English contractions
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def clean_up_spaces(text: str) -> str:
    for a, b in _CLEAN_UP:
        text = text.replace(a, b)
    return text


class HFTokenizer:
    """transformers' tokenizer for the folder (Qwen2 for InternVL2-1B), behind the same small interface."""

    def __init__(self, folder: str) -> None:
        import transformers

        cfg_file = os.path.join(folder, "tokenizer_config.json")
        name = (json.load(open(cfg_file)).get("tokenizer_class") or "") if os.path.isfile(cfg_file) else ""
        cls = getattr(transformers, name.removesuffix("Fast"), None) or transformers.AutoTokenizer
        self.tok = cls.from_pretrained(folder)
        self.eos_token_id = self.tok.eos_token_id

    def convert_tokens_to_ids(self, token: str) -> int:
        tid = self.tok.convert_tokens_to_ids(token)
        if tid is None or tid == self.tok.unk_token_id:
            raise KeyError(f"token {token!r} is not in the tokenizer")
        return int(tid)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tok(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def load_tokenizer(folder: str, llm_kind: str):
    if llm_kind == "internlm2" or os.path.isfile(os.path.join(folder, "tokenizer.model")):
        return SentencePieceTokenizer(folder)
    return HFTokenizer(folder)
