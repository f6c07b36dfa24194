"""Language conditioning without pretrained weights: hashed tokens into a learned embedding bag.

Strings cannot enter a jitted function, so instructions are tokenized on the host by
:func:`tokenize` (numpy, deterministic across processes and runs: ``zlib.crc32``, never Python's
salted ``hash``); the same function is used for training batches and at inference. Each
instruction becomes the hashed ids of its lower-cased words and of its word bigrams (a bag of
words alone cannot tell "the red block in the blue bin" from "the blue block in the red bin"),
interleaved so that truncation keeps both, padded with 0.
"""

from __future__ import annotations

import functools
import re
import zlib
from collections.abc import Iterable

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

_WORD = re.compile(r"\w+")


@functools.lru_cache(maxsize=65536)
def _token_ids(text: bytes, vocab_size: int, max_tokens: int) -> tuple[int, ...]:
    words = [w.encode() for w in _WORD.findall(text.decode("utf-8", "replace").lower())]
    grams: list[bytes] = []
    for i, word in enumerate(words):
        grams.append(b"1:" + word)
        if i + 1 < len(words):
            grams.append(b"2:" + word + b" " + words[i + 1])
    return tuple(1 + zlib.crc32(g) % (vocab_size - 1) for g in grams[:max_tokens])


def tokenize(instructions: Iterable[bytes | str] | np.ndarray, *, vocab_size: int,
             max_tokens: int) -> np.ndarray:
    """Token ids of a batch of instructions.

    Args:
      instructions: the batch's ``language_instruction`` (bytes, as the loader gives them) or
        strings, any shape.
      vocab_size: hash buckets; ids are in ``[1, vocab_size)``, 0 is padding.
      max_tokens: tokens kept per instruction (words and bigrams, interleaved).

    Returns:
      int32 ``[*shape, max_tokens]``; an empty instruction is all zeros.

    Raises:
      TypeError: for an instruction that is neither bytes nor str.
      ValueError: for ``vocab_size < 2`` or ``max_tokens < 1``.
    """
    if vocab_size < 2 or max_tokens < 1:
        raise ValueError(f"tokenize: expected vocab_size >= 2 and max_tokens >= 1, given "
                         f"{vocab_size!r} and {max_tokens!r}")
    array = np.asarray(instructions, dtype=object)
    flat = array.reshape(-1)
    # Instructions repeat (one per episode): each distinct one is tokenized once per call, and
    # once per process (_token_ids is cached), then rows are gathered.
    index = np.empty(len(flat), np.intp)
    seen: dict[bytes | str, int] = {}
    rows = [np.zeros(max_tokens, np.int32)]
    for i, text in enumerate(flat):
        if not isinstance(text, (bytes, str)):
            raise TypeError(f"tokenize: instruction {i}: expected bytes or str, given "
                            f"{type(text).__name__}")
        j = seen.get(text)
        if j is None:
            ids = _token_ids(text.encode() if isinstance(text, str) else bytes(text),
                             vocab_size, max_tokens)
            row = np.zeros(max_tokens, np.int32)
            row[:len(ids)] = ids
            j = seen[text] = len(rows)
            rows.append(row)
        index[i] = j
    return np.stack(rows)[index].reshape(*array.shape, max_tokens)


class TextEncoder(nn.Module):
    """Embedding bag: the mean of the instruction's token embeddings, layer-normalized.

    Attributes:
      vocab_size: rows of the embedding table (as given to :func:`tokenize`).
      features: embedding width.
    """

    vocab_size: int
    features: int

    @nn.compact
    def __call__(self, tokens: jnp.ndarray) -> jnp.ndarray:
        """Embeds int ``[B, L]`` token ids (0 = padding) into float ``[B, features]``."""
        table = nn.Embed(self.vocab_size, self.features,
                         embedding_init=nn.initializers.normal(stddev=1.0))
        valid = (tokens > 0).astype(jnp.float32)[..., None]
        total = jnp.sum(table(tokens) * valid, axis=-2)
        bag = total / jnp.maximum(jnp.sum(valid, axis=-2), 1.0)
        return nn.LayerNorm()(bag)
