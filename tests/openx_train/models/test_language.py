"""tokenize: deterministic hashed word and bigram ids, the same in every process."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openx_train.models import tokenize
from openx_train.models.language import TextEncoder


def test_tokens_are_words_and_bigrams_padded_with_zero():
    tokens = tokenize(np.array([b"Put the RED block", b""], object), vocab_size=1000,
                      max_tokens=10)
    assert tokens.shape == (2, 10) and tokens.dtype == np.int32
    assert (tokens[0, :7] > 0).all() and (tokens[0, 7:] == 0).all()  # 4 words, 3 bigrams
    assert (tokens[1] == 0).all()
    assert (tokens < 1000).all()
    # case and punctuation do not matter; str and bytes agree
    np.testing.assert_array_equal(tokenize(["put the red, block!"], vocab_size=1000,
                                           max_tokens=10)[0], tokens[0])


def test_bigrams_tell_swapped_words_apart():
    a, b = tokenize([b"the red block in the blue bin", b"the blue block in the red bin"],
                    vocab_size=4096, max_tokens=16)
    assert sorted(a[a > 0][::2]) == sorted(b[b > 0][::2])  # the same words
    assert sorted(a[a > 0]) != sorted(b[b > 0])  # different bigrams


def test_truncation_keeps_a_prefix_and_shapes_follow_the_input():
    long = tokenize([b"a b c d e f"], vocab_size=100, max_tokens=4)
    full = tokenize([b"a b c d e f"], vocab_size=100, max_tokens=20)
    np.testing.assert_array_equal(long[0], full[0, :4])
    assert tokenize(np.array([[b"x", b"y"]] * 3, object), vocab_size=100,
                    max_tokens=2).shape == (3, 2, 2)


def test_tokens_do_not_depend_on_the_process():
    code = ("import numpy as np; from openx_train.models import tokenize; "
            "print(tokenize([b'put the green block in the left bin'], vocab_size=4096, "
            "max_tokens=16).tolist())")
    outs = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                capture_output=True, text=True).stdout)
    assert len(outs) == 1
    here = tokenize([b"put the green block in the left bin"], vocab_size=4096, max_tokens=16)
    assert outs.pop().strip() == str(here.tolist())


def test_bad_input_raises():
    with pytest.raises(TypeError, match="instruction 1: expected bytes or str, given int"):
        tokenize([b"ok", 3], vocab_size=10, max_tokens=2)
    with pytest.raises(ValueError, match="vocab_size >= 2"):
        tokenize([b"ok"], vocab_size=1, max_tokens=2)


def test_text_encoder_ignores_padding_tokens():
    encoder = TextEncoder(vocab_size=50, features=8)
    tokens = jnp.array([[3, 7, 0, 0]])
    params = encoder.init(jax.random.PRNGKey(0), tokens)
    out = encoder.apply(params, tokens)
    table = params["params"]["Embed_0"]["embedding"]
    # the padding row never enters the mean
    changed = jax.tree.map(lambda x: x, params)
    changed["params"]["Embed_0"]["embedding"] = table.at[0].set(100.0)
    np.testing.assert_array_equal(encoder.apply(changed, tokens), out)
    assert out.shape == (1, 8)
