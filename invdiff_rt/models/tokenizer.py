"""An offline word-level tokenizer built from a dataset's captions, saved as a transformers fast tokenizer."""

from __future__ import annotations

import re
from typing import Iterable

BOS, EOS, PAD, UNK = "<|startoftext|>", "<|endoftext|>", "<|pad|>", "<|unk|>"
SPECIALS = (PAD, UNK, BOS, EOS)


def words_of(texts: Iterable[str]) -> list[str]:
    return sorted({w for t in texts for w in re.findall(r"[a-z0-9]+", t.lower())})


def build_tokenizer(texts: Iterable[str], max_length: int):
    """Word-level tokenizer: lower-cased alphanumeric words, BOS/EOS added, padded to `max_length`."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for w in words_of(texts):
        vocab[w] = len(vocab)
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=max_length, padding_side="right",
    )
