"""Writing tiny checkpoints in an original on-disk format: sharded safetensors with an index, and the cache
folder behind a built-in ``--model_path`` name (rewritten whenever the code that writes it changes)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Callable

import torch


def save_shards(state: dict[str, torch.Tensor], folder: str, shards: int = 2) -> None:
    """``state`` as ``model-0000i-of-0000n.safetensors`` files (plus ``model.safetensors.index.json`` when
    there is more than one), the layout of the checkpoints users download."""
    from safetensors.torch import save_file

    names = sorted(state)
    per = -(-len(names) // max(1, shards))
    total = -(-len(names) // per)
    weight_map = {}
    for i in range(0, len(names), per):
        fname = f"model-{i // per + 1:05d}-of-{total:05d}.safetensors"
        save_file({k: state[k].contiguous() for k in names[i:i + per]}, os.path.join(folder, fname),
                  metadata={"format": "pt"})
        weight_map.update({k: fname for k in names[i:i + per]})
    if total > 1:
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)


def cached_checkpoint(tag: str, sources: list[str], write: Callable[[str], object]) -> str:
    """The folder ``$MQUANT_CACHE/<tag>-<hash of sources>`` (default cache: ``~/.cache/mquant``), written
    once by ``write(folder)``; concurrent writers are fine (the first complete folder wins)."""
    root = os.environ.get("MQUANT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mquant")
    digest = hashlib.sha256(b"".join(open(s, "rb").read() for s in sources)).hexdigest()[:10]
    folder = os.path.join(root, f"{tag}-{digest}")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        tmp = folder + f".tmp{os.getpid()}"
        write(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process wrote it first
            if not os.path.isfile(os.path.join(folder, "config.json")):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def write_bpe_tokenizer(folder: str, corpus: str, added: list[str], vocab_size: int, config: dict) -> int:
    """A byte-level BPE learned on ``corpus`` (``vocab.json`` + ``merges.txt``, the files of a Qwen2 tokenizer) and a
    ``tokenizer_config.json`` of ``config`` whose ``added_tokens_decoder`` puts the ``added`` tokens after the
    vocabulary, special; returns the vocabulary size including them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus.splitlines() * 4, trainer)
    tok.model.save(folder)
    base = tok.get_vocab_size()
    decoder = {str(base + i): {"content": t, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                               "single_word": False} for i, t in enumerate(added)}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({**config, "added_tokens_decoder": decoder}, f, indent=1)
    return base + len(added)
