"""Tokenizers for the tiny twins of the real models, trained in memory in ~0.01 s.

The tiny models (`conf/model/tiny_*.yaml`) use the same diffusers and
transformers classes as the real ones, with tiny configs and random weights;
only their tokenizers cannot come from a hub, so they are trained here on a
corpus the config passes in (the offline captions' vocabulary,
`fraqat_cli.data.captions.tokenizer_corpus`, which lives with the data).
"""

from __future__ import annotations

from transformers import CLIPTokenizer, GemmaTokenizer, T5Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode


def gemma_tokenizer(corpus: list[str], vocab_size: int = 300, model_max_length: int = 300) -> GemmaTokenizer:
    tok = GemmaTokenizer().train_new_from_iterator(corpus, vocab_size=vocab_size, show_progress=False)
    tok.model_max_length = model_max_length
    return tok


def t5_tokenizer(corpus: list[str], vocab_size: int = 200, model_max_length: int = 512) -> T5Tokenizer:
    tok = T5Tokenizer(extra_ids=0).train_new_from_iterator(corpus, vocab_size=vocab_size,
                                                          show_progress=False)
    tok.model_max_length = model_max_length
    return tok


def clip_tokenizer() -> CLIPTokenizer:
    """CLIP's byte-level BPE with no merges: one token per byte (514 ids, start/end first).

    Trained merges would be shorter, but the BPE trainer breaks ties in hash order, so each process
    would tokenize differently; a fixed vocabulary keeps the tiny twins the same everywhere.
    """
    chars = list(bytes_to_unicode().values())
    vocab = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    return CLIPTokenizer(vocab={token: i for i, token in enumerate(vocab)}, merges=[],
                         model_max_length=77)  # pipelines slice to 77; unset it overflows
