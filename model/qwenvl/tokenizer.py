"""Qwen-VL-Chat tokenizer without remote code.

A checkpoint folder ships ``qwen.tiktoken``: byte-level BPE ranks, one ``base64(token bytes) rank`` line each,
read here into a ``tiktoken.Encoding``. The special tokens take the ids right after the ranks. An image is
referenced in the text as ``<img>path</img>``; :meth:`QWenTokenizer.encode` turns the path into exactly
:data:`IMAGE_SPAN` ids between the tags (the path's UTF-8 bytes, id b for byte b, then ``<imgpad>``), the slots
the model overwrites with the visual features. :meth:`QWenTokenizer.make_context` builds the chatml prompt of
``model.chat()``.
"""
from __future__ import annotations

import base64
import os
import tempfile
import unicodedata
from collections import Counter
from typing import Any, Collection, Iterable, Sequence

# cl100k-like, except that digits are split one by one
PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
           r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

VOCAB_FILE = "qwen.tiktoken"
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
EXTRAS = tuple(f"<|extra_{i}|>" for i in range(205))
REF_START, REF_END = "<ref>", "</ref>"
BOX_START, BOX_END = "<box>", "</box>"
QUAD_START, QUAD_END = "<quad>", "</quad>"
IMG_START, IMG_END, IMG_PAD = "<img>", "</img>", "<imgpad>"
# the only specials recognised inside chat turns: a user typing "<|im_start|>" must not open a turn
IMAGE_ST = (REF_START, REF_END, BOX_START, BOX_END, QUAD_START, QUAD_END, IMG_START, IMG_END, IMG_PAD)
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END) + EXTRAS + IMAGE_ST
IMAGE_SPAN = 256
DEFAULT_SYSTEM = "You are a helpful assistant."


def special_token_ids(n_ranks: int) -> dict[str, int]:
    """Special token -> id; they follow the ``n_ranks`` BPE ranks in the checkpoint's fixed order."""
    return {tok: n_ranks + i for i, tok in enumerate(SPECIAL_TOKENS)}


def gpt2_byte_order() -> list[int]:
    """The 256 byte values in GPT-2's printable-first order: the order of ranks 0..255 in ``qwen.tiktoken``."""
    first = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    seen = set(first)
    return first + [b for b in range(256) if b not in seen]


def read_tiktoken(path: str | os.PathLike) -> dict[bytes, int]:
    """Token bytes -> rank, from a ``.tiktoken`` file; the ranks must be 0..n-1."""
    with open(path, "rb") as f:
        lines = (line.split() for line in f.read().splitlines() if line)
        ranks = {base64.b64decode(tok): int(rank) for tok, rank in lines}
    # the special ids are placed at len(ranks): a gap or a duplicate would make two tokens share an id
    if set(ranks.values()) != set(range(len(ranks))):
        raise ValueError(f"{path}: the ranks are not exactly 0..{len(ranks) - 1}")
    return ranks


class QWenTokenizer:
    """The Qwen-VL-Chat tokenizer, read from a checkpoint folder holding ``qwen.tiktoken``."""

    IMAGE_SPAN = IMAGE_SPAN

    def __init__(self, folder: str | os.PathLike) -> None:
        import tiktoken

        path = os.fspath(folder)
        if not os.path.isfile(path):
            path = os.path.join(path, VOCAB_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: the Qwen-VL tokenizer needs {VOCAB_FILE}; "
                                    f"copy {VOCAB_FILE} from the original Qwen-VL-Chat checkpoint")
        self.mergeable_ranks = read_tiktoken(path)
        self.n_ranks = len(self.mergeable_ranks)
        self.special_tokens = special_token_ids(self.n_ranks)
        self._enc = tiktoken.Encoding(name="qwen", pat_str=PAT_STR, mergeable_ranks=self.mergeable_ranks,
                                      special_tokens=self.special_tokens)
        self.n_vocab = self.n_ranks + len(self.special_tokens)
        if self._enc.n_vocab != self.n_vocab:
            raise ValueError(f"{path}: tiktoken counts {self._enc.n_vocab} tokens, expected {self.n_vocab}")
        sp = self.special_tokens
        self.eod_id = sp[ENDOFTEXT]
        self.im_start_id, self.im_end_id = sp[IM_START], sp[IM_END]
        self.ref_start_id, self.ref_end_id = sp[REF_START], sp[REF_END]
        self.box_start_id, self.box_end_id = sp[BOX_START], sp[BOX_END]
        self.quad_start_id, self.quad_end_id = sp[QUAD_START], sp[QUAD_END]
        self.img_start_id, self.img_end_id, self.img_pad_id = sp[IMG_START], sp[IMG_END], sp[IMG_PAD]
        # the stop words of chatml generation, in the original's order
        self.stop_ids = (self.im_end_id, self.im_start_id)

    def __len__(self) -> int:
        return self.n_vocab

    # -- encoding ------------------------------------------------------------------------------------------------

    def encode(self, text: str, allowed_special: str | Collection[str] = "all") -> list[int]:
        """Ids of ``text``; ``allowed_special`` names the special tokens recognised in it ("all" by default)."""
        text = unicodedata.normalize("NFC", text)
        allowed = allowed_special if allowed_special == "all" else set(allowed_special)
        # disallowed_special=(): a special's surface form that is not allowed is plain text, not an error
        ids = self._enc.encode(text, allowed_special=allowed, disallowed_special=())
        return self._pack_images(ids)

    def _pack_images(self, ids: list[int]) -> list[int]:
        out: list[int] = []
        pos = 0
        while True:
            try:
                start = ids.index(self.img_start_id, pos)
            except ValueError:
                break
            try:
                end = ids.index(self.img_end_id, start + 1)
            except ValueError:
                raise ValueError(f"Unclosed image token: {IMG_START} without {IMG_END}") from None
            inner = ids[start + 1:end]
            if any(t >= self.n_ranks for t in inner):
                raise ValueError(f"a special token inside {IMG_START}...{IMG_END}")
            raw = self._enc.decode_bytes(inner)
            if len(raw) > IMAGE_SPAN:
                raise ValueError(f"the content of {IMG_START}...{IMG_END} is {len(raw)} bytes long, "
                                 f"more than the {IMAGE_SPAN} image slots")
            out.extend(ids[pos:start])
            out.append(self.img_start_id)
            out.extend(raw)  # id b for byte b, as the original
            out.extend([self.img_pad_id] * (IMAGE_SPAN - len(raw)))
            out.append(self.img_end_id)
            pos = end + 1
        out.extend(ids[pos:])
        return out

    # -- decoding ------------------------------------------------------------------------------------------------

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False, errors: str = "replace") -> str:
        """Text of ``ids``; an image span reads back as ``<img>path</img>`` (the bare path when skipping specials)."""
        ids = _as_list(ids)
        buf = bytearray()
        run: list[int] = []
        i = 0
        while i < len(ids):
            t = ids[i]
            if t == self.img_start_id:
                try:
                    end = ids.index(self.img_end_id, i + 1)
                except ValueError:
                    raise ValueError(f"Unclosed image token: {IMG_START} without {IMG_END}") from None
                inner = ids[i + 1:end]
                if self.img_pad_id in inner:
                    inner = inner[:inner.index(self.img_pad_id)]
                if any(not 0 <= b < 256 for b in inner):
                    raise ValueError(f"an id inside {IMG_START}...{IMG_END} is not a byte value")
                buf += self._enc.decode_bytes(run)
                run = []
                buf += bytes(inner) if skip_special_tokens else IMG_START.encode() + bytes(inner) + IMG_END.encode()
                i = end + 1
                continue
            if not 0 <= t < self.n_vocab:
                # ids >= n_vocab are the embedding's padding rows: nothing to show when skipping specials
                if not (skip_special_tokens and t >= self.n_vocab):
                    raise ValueError(f"token id {t} is outside the vocabulary (0..{self.n_vocab - 1})")
            elif not (skip_special_tokens and t >= self.eod_id):
                run.append(t)
            i += 1
        buf += self._enc.decode_bytes(run)
        return buf.decode("utf-8", errors=errors)

    def decode_response(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """The reply in the ids generated after the context: up to the first stop token or eod, stripped."""
        ids = _as_list(ids)
        stops = {self.im_start_id, self.im_end_id, self.eod_id}
        cut = next((k for k, t in enumerate(ids) if t in stops), len(ids))
        return self.decode(ids[:cut], skip_special_tokens=skip_special_tokens).strip()

    # -- images --------------------------------------------------------------------------------------------------

    def image_slots(self, ids: Iterable[int]) -> list[tuple[int, int]]:
        """(start, end) positions of each ``<img>``/``</img>`` pair; the features go to start+1..end-1."""
        slots: list[tuple[int, int]] = []
        start = None
        for k, t in enumerate(_as_list(ids)):
            if t == self.img_start_id:
                if start is not None:
                    raise ValueError(f"{IMG_START} at {k} inside the image span opened at {start}")
                start = k
            elif t == self.img_end_id:
                if start is None:
                    raise ValueError(f"{IMG_END} at {k} without {IMG_START}")
                if k - start - 1 != IMAGE_SPAN:
                    raise ValueError(f"the image span at {start}..{k} has {k - start - 1} slots, not {IMAGE_SPAN}")
                slots.append((start, k))
                start = None
        if start is not None:
            raise ValueError(f"Unclosed image token: {IMG_START} at {start} without {IMG_END}")
        return slots

    def image_paths(self, ids: Iterable[int]) -> list[str]:
        """The path written in each image span, in order."""
        ids = _as_list(ids)
        paths = []
        for start, end in self.image_slots(ids):
            inner = ids[start + 1:end]
            if self.img_pad_id in inner:
                inner = inner[:inner.index(self.img_pad_id)]
            paths.append(bytes(inner).decode("utf-8"))
        return paths

    # -- prompts -------------------------------------------------------------------------------------------------

    def from_list_format(self, items: Sequence[dict[str, Any]]) -> str:
        """Query text from ``[{"image": path}, {"text": ...}, {"box": [(x1, y1, x2, y2)], "ref": ...}]``."""
        text = ""
        n_images = 0
        for item in items:
            if "image" in item:
                n_images += 1
                text += f"Picture {n_images}: {IMG_START}{item['image']}{IMG_END}\n"
            elif "text" in item:
                text += item["text"]
            elif "box" in item:
                if "ref" in item:
                    text += f"{REF_START}{item['ref']}{REF_END}"
                for box in item["box"]:
                    # %d truncates, as the original: coordinates are integers on the 0..1000 grid
                    text += BOX_START + "(%d,%d),(%d,%d)" % tuple(box[:4]) + BOX_END
            else:
                raise ValueError(f"unsupported element: {item!r}")
        return text

    def make_context(self, query: str, history: Sequence[tuple[str, str | None]] | None = None,
                     system: str = DEFAULT_SYSTEM, max_window_size: int = 6144) -> tuple[str, list[int]]:
        """(raw text, ids) of the chatml prompt of ``model.chat()``, ending with the assistant turn's opening."""
        nl = self.encode("\n")

        def turn(role: str, content: str) -> tuple[str, list[int]]:
            ids = self.encode(role, allowed_special=IMAGE_ST) + nl + self.encode(content, allowed_special=IMAGE_ST)
            return f"{role}\n{content}", ids

        system_text, system_ids = turn("system", system)
        system_ids = [self.im_start_id] + system_ids + [self.im_end_id]
        raw_text, context = "", []
        # newest turns first, so that a long history loses its oldest turns
        for turn_query, turn_response in reversed(list(history or [])):
            q_text, q_ids = turn("user", turn_query)
            q_ids = [self.im_start_id] + q_ids + [self.im_end_id]
            if turn_response is not None:
                r_text, r_ids = turn("assistant", turn_response)
                r_ids = [self.im_start_id] + r_ids + [self.im_end_id]
                step = nl + q_ids + nl + r_ids
                step_text = f"\n{IM_START}{q_text}{IM_END}\n{IM_START}{r_text}{IM_END}"
            else:
                step = nl + q_ids + nl
                step_text = f"\n{IM_START}{q_text}{IM_END}\n"
            if len(system_ids) + len(step) + len(context) >= max_window_size:
                break
            context = step + context
            raw_text = step_text + raw_text
        context = (system_ids + context + nl + [self.im_start_id] + turn("user", query)[1] + [self.im_end_id]
                   + nl + [self.im_start_id] + self.encode("assistant") + nl)
        raw_text = (f"{IM_START}{system_text}{IM_END}" + raw_text
                    + f"\n{IM_START}user\n{query}{IM_END}\n{IM_START}assistant\n")
        return raw_text, context


def _as_list(ids: Iterable[int]) -> list[int]:
    # tensors and arrays: one tolist() instead of a Python int per element
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(t) for t in ids]


def write_tiny_tiktoken(folder: str | os.PathLike, corpus: str, vocab_size: int = 320, filename: str = VOCAB_FILE,
                        pat_str: str = PAT_STR) -> int:
    """Write a small tiktoken rank file (``qwen.tiktoken`` by default) into ``folder``: the 256 bytes, then BPE
    merges learned on ``corpus`` split by ``pat_str`` (the split pattern of the tokenizer that will read it).

    Returns the number of ranks (``vocab_size`` unless the corpus runs out of pairs first).
    """
    import regex

    if vocab_size < 256:
        raise ValueError(f"vocab_size {vocab_size} < 256: every byte needs a rank")
    ranks = {bytes([b]): r for r, b in enumerate(gpt2_byte_order())}
    words = Counter(tuple(bytes([b]) for b in w.encode("utf-8")) for w in regex.findall(pat_str, corpus))
    while len(ranks) < vocab_size:
        pairs: Counter = Counter()
        for word, freq in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += freq
        if not pairs:
            break
        # most frequent pair; ties go to the lower ranks so that the file does not depend on dict order
        a, b = min(pairs, key=lambda p: (-pairs[p], ranks[p[0]], ranks[p[1]]))
        merged = a + b
        if merged not in ranks:
            ranks[merged] = len(ranks)
        new_words: Counter = Counter()
        for word, freq in words.items():
            out, k = [], 0
            while k < len(word):
                if k + 1 < len(word) and word[k] == a and word[k + 1] == b:
                    out.append(merged)
                    k += 2
                else:
                    out.append(word[k])
                    k += 1
            new_words[tuple(out)] += freq
        words = new_words
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    text = "".join(f"{base64.b64encode(tok).decode('ascii')} {rank}\n" for tok, rank in ranks.items())
    # written aside and renamed, so that a reader never sees half a file
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{filename}.")
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(text)
    os.replace(tmp, os.path.join(folder, filename))
    return len(ranks)
