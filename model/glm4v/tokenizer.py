"""GLM-4V's tokenizer without remote code: ``tokenizer.model`` ranks through the ``tiktoken`` package.

``tokenizer.model`` holds byte-level BPE ranks, one ``base64(token bytes) rank`` line each (the format tiktoken
reads), split by the cl100k pattern (digits in runs of up to three). The special tokens are not tiktoken
specials in the original but transformers "added tokens" right after the ranks (``<|endoftext|>`` 151329 ...
``<|end_of_video|>`` 151342); their ids are read from ``tokenizer_config.json``'s ``added_tokens_decoder`` when
the folder has one, else placed after the ranks in the original order. The chat template builds ids directly,
as the original's ``apply_chat_template``: message text is encoded with no special tokens recognised, so a user
typing "<|user|>" gets plain text.
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterable

from ..qwenvl.tokenizer import read_tiktoken

VOCAB_FILE = "tokenizer.model"
PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
           r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
ENDOFTEXT, GMASK, SOP = "<|endoftext|>", "[gMASK]", "<sop>"
USER, ASSISTANT, OBSERVATION = "<|user|>", "<|assistant|>", "<|observation|>"
BOI, EOI = "<|begin_of_image|>", "<|end_of_image|>"
SPECIAL_TOKENS = (ENDOFTEXT, "[MASK]", GMASK, "[sMASK]", SOP, "<eop>", "<|system|>", USER, ASSISTANT, OBSERVATION,
                  BOI, EOI, "<|begin_of_video|>", "<|end_of_video|>")
STOP_TOKENS = (ENDOFTEXT, USER, OBSERVATION)  # generation_config.json's eos_token_id, in its order


def special_token_ids(folder: str, n_ranks: int) -> dict[str, int]:
    """Special token -> id: from ``tokenizer_config.json``'s ``added_tokens_decoder`` when present, else right
    after the ranks in the original order."""
    cfg_file = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(cfg_file):
        with open(cfg_file) as f:
            added = json.load(f).get("added_tokens_decoder") or {}
        if added:
            ids = {v["content"]: int(k) for k, v in added.items()}
            missing = [t for t in SPECIAL_TOKENS[:12] if t not in ids]
            if missing:
                raise ValueError(f"{cfg_file}: added_tokens_decoder lacks {', '.join(missing)}: not a GLM-4V tokenizer")
            low = [t for t, i in ids.items() if i < n_ranks]
            if low:
                raise ValueError(f"{cfg_file}: added tokens {', '.join(low)} have ids inside the {n_ranks} BPE ranks")
            return ids
    return {tok: n_ranks + i for i, tok in enumerate(SPECIAL_TOKENS)}


class GLM4Tokenizer:
    """The GLM-4V tokenizer, read from a checkpoint folder holding ``tokenizer.model``."""

    def __init__(self, folder: str | os.PathLike) -> None:
        import tiktoken

        folder = os.fspath(folder)
        path = os.path.join(folder, VOCAB_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: the GLM-4V tokenizer needs {VOCAB_FILE}; copy it from the "
                                    "original glm-4v-9b checkpoint")
        ranks = read_tiktoken(path)
        self.n_ranks = len(ranks)
        self._enc = tiktoken.Encoding(name="glm4", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens={})
        self.special_tokens = special_token_ids(folder, self.n_ranks)
        self.special_by_id = {i: t for t, i in self.special_tokens.items()}
        self.n_vocab = max(self.n_ranks, max(self.special_by_id) + 1)
        sp = self.special_tokens
        self.eot_id, self.gmask_id, self.sop_id = sp[ENDOFTEXT], sp[GMASK], sp[SOP]
        self.user_id, self.assistant_id = sp[USER], sp[ASSISTANT]
        self.boi_id, self.eoi_id = sp[BOI], sp[EOI]
        self.stop_ids = tuple(sp[t] for t in STOP_TOKENS)
        self._special_re = re.compile("|".join(re.escape(t) for t in sorted(sp, key=len, reverse=True)))

    def __len__(self) -> int:
        return self.n_vocab

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Ids of ``text``; with ``allow_special`` the special tokens' strings in it become their ids (as
        transformers' added tokens would), otherwise they are plain text (as in chat messages)."""
        if not allow_special:
            return self._enc.encode(text, allowed_special=set(), disallowed_special=())
        ids: list[int] = []
        pos = 0
        for m in self._special_re.finditer(text):
            ids += self._enc.encode(text[pos:m.start()], allowed_special=set(), disallowed_special=())
            ids.append(self.special_tokens[m.group()])
            pos = m.end()
        return ids + self._enc.encode(text[pos:], allowed_special=set(), disallowed_special=())

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False, errors: str = "replace") -> str:
        """Text of ``ids``: BPE bytes decoded as UTF-8, special tokens as their strings (or left out)."""
        out, run = [], []
        for t in _as_list(ids):
            if t in self.special_by_id:
                out.append(self._enc.decode_bytes(run).decode("utf-8", errors=errors))
                run = []
                if not skip_special_tokens:
                    out.append(self.special_by_id[t])
            elif 0 <= t < self.n_ranks:
                run.append(t)
            elif not (skip_special_tokens and t >= self.n_vocab):
                # ids past the vocabulary are the embedding's padding rows: nothing to show when skipping specials
                raise ValueError(f"token id {t} is neither a BPE rank (0..{self.n_ranks - 1}) nor a special token")
        out.append(self._enc.decode_bytes(run).decode("utf-8", errors=errors))
        return "".join(out)

    def decode_response(self, ids: Iterable[int]) -> str:
        """The reply in the ids generated after the prompt: up to the first stop id, special tokens left out,
        stripped. (VLMEvalKit cuts only at ``<|endoftext|>`` and keeps a trailing ``<|user|>``'s text.)"""
        ids = _as_list(ids)
        cut = next((k for k, t in enumerate(ids) if t in self.stop_ids), len(ids))
        return self.decode(ids[:cut], skip_special_tokens=True).strip()

    def chat_ids(self, content: str, image: bool = True) -> list[int]:
        """One user turn and the assistant's opening, as the original's ``apply_chat_template(...,
        add_generation_prompt=True)``: ``[gMASK]<sop><|user|>\\n`` + the image triple + content + ``<|assistant|>``
        (no newline after the image or after ``<|assistant|>``)."""
        triple = [self.boi_id, self.eot_id, self.eoi_id] if image else []
        return ([self.gmask_id, self.sop_id, self.user_id] + self.encode("\n") + triple + self.encode(content)
                + [self.assistant_id])


def _as_list(ids: Iterable[int]) -> list[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(t) for t in ids]
