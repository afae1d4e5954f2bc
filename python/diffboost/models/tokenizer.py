"""A CLIP tokenizer that is built from scratch, so tests and benchmarks never need the model hub.

The vocabulary follows the layout of a CLIP byte-level BPE vocabulary: the 256 byte symbols, the same
256 symbols with the ``</w>`` end-of-word marker, the tokens produced by the merges, and finally
``<|startoftext|>`` / ``<|endoftext|>``.  The merges are learned deterministically from a small
built-in English word list, so common prompt words become single tokens and token counts look like
those of real prompts.  Because every byte symbol (with and without ``</w>``) is in the vocabulary,
any text tokenizes without unknown tokens.

Only the vocabulary is invented; normalization, pre-tokenization and decoding are those of
``transformers.CLIPTokenizer``, so the pipelines see exactly the token stream layout they expect
(BOS, tokens, EOS, then EOS-padding up to 77 positions).
"""

from __future__ import annotations

import collections
import functools
import json
import os
import tempfile

__all__ = [
    "BOS_TOKEN",
    "CLIP_MAX_LENGTH",
    "EOS_TOKEN",
    "clip_vocabulary",
    "offline_clip_tokenizer",
    "write_clip_vocabulary",
]

#: Context length of every CLIP text encoder used by Stable Diffusion.
CLIP_MAX_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
_END_OF_WORD = "</w>"

# Words typical of text-to-image prompts plus frequent English function words.  The list is the
# training corpus for the merges; it only has to be stable, not complete.
_WORDS = """
a an the of and in on at to with for from by as is are was be it this that or not no
photo photograph picture image painting drawing illustration portrait landscape render sketch
astronaut horse riding cat dog bird fish lion tiger bear wolf fox rabbit dragon unicorn robot
man woman child girl boy person people face eyes hair hand smile king queen knight warrior
city street house castle tower bridge road village forest mountain mountains river lake ocean
sea beach island desert field garden park sky cloud clouds sun moon star stars space planet
night day morning evening sunset sunrise winter summer spring autumn snow rain fog storm light
red blue green yellow orange purple pink black white gray brown golden silver colorful dark
bright beautiful cute small big large tall old young new ancient modern futuristic magical
detailed highly realistic photorealistic cinematic dramatic soft sharp focus lighting studio
style art artist digital concept fantasy science fiction anime cartoon oil watercolor canvas
high quality resolution masterpiece trending professional camera lens wide angle close view
standing sitting walking running flying floating swimming holding wearing looking playing
under over above behind near inside outside top front back side center background foreground
table chair window door room kitchen library wall floor book cup coffee flower flowers tree
trees grass leaves rock stone water fire ice glass metal wood gold crystal neon shadow smoke
car train ship boat plane bicycle street lamp sign market shop cafe restaurant museum temple
""".split()


def _byte_symbols() -> list[str]:
    """The 256 printable symbols that byte-level BPE uses in place of raw bytes, in byte order.

    Bytes that are printable and not whitespace stand for themselves; the others (control bytes,
    space, a few Latin-1 blanks) are moved to consecutive code points from U+0100 upwards.  This
    is the convention ``tokenizers.pre_tokenizers.ByteLevel`` applies to its input, so the
    vocabulary must be spelled in it.
    """
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    symbols = []
    moved = 0
    for byte in range(256):
        if byte in keep:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + moved))
            moved += 1
    return symbols


def _learn_merges(words: list[str], symbols: list[str]) -> list[tuple[str, str]]:
    """Learn BPE merges on ``words`` until every word is a single token.

    Ties between equally frequent pairs are broken by the pair's spelling, which makes the result
    independent of dict ordering and Python version.
    """
    corpus = []
    for word in words:
        chars = [symbols[b] for b in word.encode("utf-8")]
        chars[-1] += _END_OF_WORD
        corpus.append(chars)

    merges = []
    while True:
        counts = collections.Counter(pair for word in corpus for pair in zip(word, word[1:]))
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        corpus = [_apply_merge(word, best) for word in corpus]


def _apply_merge(word: list[str], pair: tuple[str, str]) -> list[str]:
    merged = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            merged.append(word[i] + word[i + 1])
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return merged


@functools.lru_cache(maxsize=1)
def clip_vocabulary() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Return ``(vocab, merges)`` of the offline CLIP tokenizer.

    ``vocab`` maps token strings to ids; ``<|endoftext|>`` has the largest id, which CLIP text
    encoders with the legacy ``eos_token_id == 2`` config rely on to find the pooled position
    (they take the argmax of the input ids).
    """
    symbols = _byte_symbols()
    tokens = symbols + [s + _END_OF_WORD for s in symbols]
    merges = _learn_merges(_WORDS, symbols)
    vocab = {token: i for i, token in enumerate(tokens)}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    return vocab, tuple(merges)


def write_clip_vocabulary(directory: str | os.PathLike) -> None:
    """Write ``vocab.json`` and ``merges.txt`` of the offline CLIP tokenizer into ``directory``."""
    vocab, merges = clip_vocabulary()
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{left} {right}\n" for left, right in merges)


def offline_clip_tokenizer(directory: str | os.PathLike | None = None):
    """Build a ``transformers.CLIPTokenizer`` without any download.

    Args:
        directory: where to write ``vocab.json`` and ``merges.txt``.  The files are kept there
            (e.g. to save a pipeline next to them).  With ``None`` they go to a temporary
            directory that is removed once the tokenizer is loaded (it keeps everything in memory).

    Returns:
        A ``CLIPTokenizer`` with ``model_max_length == 77`` that pads with ``<|endoftext|>`` like
        the Stable Diffusion 1.x tokenizer.  Its ids are all below ``len(tokenizer)``, a few
        thousand, hence valid for real CLIP text encoders (vocab_size 49408) and for the tiny ones
        of the test presets, which size their embedding table to ``len(tokenizer)``.
    """
    from transformers import CLIPTokenizer

    if directory is None:
        with tempfile.TemporaryDirectory(prefix="diffboost-clip-tokenizer-") as tmp:
            return offline_clip_tokenizer(tmp)
    write_clip_vocabulary(directory)
    return CLIPTokenizer.from_pretrained(
        os.fspath(directory),
        local_files_only=True,
        model_max_length=CLIP_MAX_LENGTH,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
    )
