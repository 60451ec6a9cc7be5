"""An offline word-level tokenizer built from a dataset's captions, saved as a transformers fast tokenizer."""

from __future__ import annotations

from typing import Iterable

BOS, EOS, PAD, UNK = "<|startoftext|>", "<|endoftext|>", "<|pad|>", "<|unk|>"
SPECIALS = (PAD, UNK, BOS, EOS)


def _splitters():
    from tokenizers import normalizers, pre_tokenizers

    return normalizers.Lowercase(), pre_tokenizers.Whitespace()


def words_of(texts: Iterable[str]) -> list[str]:
    """The words the tokenizer will see: its own normaliser and pre-tokenizer applied (a vocabulary of
    `[a-z0-9]+` words made "bird," "café" and any non-Latin word unknown, so distinct captions tokenized alike)."""
    norm, pre = _splitters()
    return sorted({w for t in texts for w, _ in pre.pre_tokenize_str(norm.normalize_str(t))})


def token_count(text: str) -> int:
    """How many words and punctuation runs the tokenizer makes of `text` (before BOS/EOS)."""
    norm, pre = _splitters()
    return len(pre.pre_tokenize_str(norm.normalize_str(text)))


def build_tokenizer(texts: Iterable[str], max_length: int):
    """Word-level tokenizer: lower-cased words and runs of punctuation (the `Whitespace` pre-tokenizer), BOS/EOS
    added, padded to `max_length`."""
    from tokenizers import Tokenizer, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for w in words_of(texts):
        vocab[w] = len(vocab)
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer, tok.pre_tokenizer = _splitters()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=max_length, padding_side="right",
    )
