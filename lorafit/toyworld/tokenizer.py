"""A word-level CLIP tokenizer for the toy world: each world word is exactly one token.

The pipeline must load with a stock ``CLIPTokenizer`` (that is what ``model_index.json`` names),
and ``CLIPTokenizer`` is a byte-level BPE: it splits a word into characters and applies merges.
A whole-word vocabulary therefore needs merges that build each word from its letters (the
letters and every partial piece must be in the vocabulary too), learnt here the way BPE learns
them, but from a fixed word list instead of corpus counts. So:

* every world word, the held-out shape's name and the rare trigger words are one token each;
* any other lowercase word falls apart into single letters, as a rare word falls apart into
  sub-word pieces in the real CLIP tokenizer; those letter tokens are never trained;
* anything else (digits, other symbols) becomes the unknown token, which in CLIP is
  ``<|endoftext|>``.
"""

from __future__ import annotations

import itertools
import string

from lorafit.toyworld.world import COLOUR_NAMES, HELD_OUT_SHAPE, TRIGGER, WORLD_SHAPES

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Context length. The world's captions are 9 tokens with BOS/EOS; 16 leaves room for a trigger
# and a few extra words at a fifth of CLIP's 77-token cost.
MODEL_MAX_LENGTH = 16

# Words the base model is trained on.
WORLD_WORDS: tuple[str, ...] = ("a", "on", "background", *COLOUR_NAMES, *WORLD_SHAPES)
# Single tokens the base model never sees in training, like rare tokens in a real CLIP vocabulary:
# the held-out shape's name, trigger words, and words a user might write around them.
RARE_WORDS: tuple[str, ...] = (HELD_OUT_SHAPE, TRIGGER, "sks", "shape", "of", "the", "an", "with")
PUNCTUATION: tuple[str, ...] = (",", ".")


def vocabulary_and_merges(words=WORLD_WORDS + RARE_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocab and merge list that make each of ``words`` a single ``word</w>`` token."""
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    add(BOS)
    add(EOS)
    for letter in string.ascii_lowercase:  # lets any lowercase word tokenize (letter by letter)
        add(letter)
        add(letter + "</w>")
    for mark in PUNCTUATION:
        add(mark + "</w>")
    merges: list[tuple[str, str]] = []
    rank: dict[tuple[str, str], int] = {}
    for word in words:
        # Replay BPE on the word with the merges so far (lowest rank first, as the tokenizer does);
        # where it gets stuck, add a merge of the leftmost pair. New merges rank last, so they can
        # never pre-empt a step of an earlier word's derivation: earlier words stay single tokens.
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            pairs = [(rank.get(pair, len(rank)), i) for i, pair in enumerate(itertools.pairwise(pieces))]
            best, i = min(pairs)
            if best == len(rank):  # no known merge applies
                pair = (pieces[0], pieces[1])
                rank[pair] = len(merges)
                merges.append(pair)
                i = 0
            pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
            add(pieces[i])
    return vocab, merges


def build_world_tokenizer(model_max_length: int = MODEL_MAX_LENGTH):
    """A ``CLIPTokenizer`` whose whole-word tokens are the toy world's words (see module docstring)."""
    from transformers import CLIPTokenizer

    vocab, merges = vocabulary_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length, pad_token=EOS)
