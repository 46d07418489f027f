"""The torch-free CLIP tokenizer gives open_clip's ids, so the API tokenizes as training did."""
import gzip
import shutil

import numpy as np
import pytest
from open_clip.tokenizer import SimpleTokenizer

from histoseek.errors import HistoseekError
from histoseek.text_tokenizer import (CLIP_VOCAB, TextTooLong, TokenizerSpec, clip_bpe_spec, find_vocab,
                                      load_tokenizer)

TEXTS = [
    "a histopathology image of tubular adenoma",
    "a histopathology image of AC",
    "A Histopathology IMAGE of  serrated   adenoma.",
    "H&E stain, 20x: glands with nuclear atypia (grade 2/3); mitoses++",
    "tumour-infiltrating lymphocytes & stroma &amp; fat",
    "Ki-67 index 35%, p53 +, HER2 3+",
    "café naïve façade — “quoted” ‘text’ … 肿瘤 腺癌",
    "emoji 🔬🧫 and tabs\tand\nnewlines",
    "don't we'll they're I'm it's you've he'd",
    "",
    "   ",
    "x" * 300,
    "villous " * 40,
    "12345 67 8.9e-3",
]


@pytest.mark.parametrize("context_length", [32, 77])
def test_same_ids_as_open_clip(context_length):
    ours = load_tokenizer(clip_bpe_spec(context_length))
    theirs = SimpleTokenizer(context_length=context_length)
    expected = theirs(TEXTS).numpy()
    got = ours(TEXTS)
    assert got.dtype == np.int64 and got.shape == (len(TEXTS), context_length)
    np.testing.assert_array_equal(got, expected)
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text)


def test_a_text_over_the_context_is_refused_when_asked():
    tokenizer = load_tokenizer(clip_bpe_spec(32))
    assert tokenizer.count("a histopathology image of tubular adenoma") == 12  # histo·patho·logy, tub·ular, ad·en·oma
    with pytest.raises(TextTooLong, match="at most 32"):
        tokenizer(["villous " * 40], truncate=False)
    tokenizer(["cell " * 30], truncate=False)  # 30 tokens + start + end fit exactly


def test_the_vocabulary_is_found_by_name_and_checksum(tmp_path):
    spec = clip_bpe_spec(32)
    assert spec.kind == "clip_bpe" and spec.vocab == CLIP_VOCAB
    assert TokenizerSpec.from_dict(spec.to_dict()) == spec
    # A folder given first wins when its file has the right checksum ...
    shutil.copyfile(find_vocab(spec), tmp_path / CLIP_VOCAB)
    assert find_vocab(spec, [tmp_path]) == tmp_path / CLIP_VOCAB
    # ... and is passed over when it does not.
    other = tmp_path / "other"
    other.mkdir()
    with gzip.open(other / CLIP_VOCAB, "wt") as f:
        f.write("#version\n")
    assert find_vocab(spec, [other]) != other / CLIP_VOCAB
    missing = TokenizerSpec("clip_bpe", 32, "no_such_vocab.txt.gz", "0" * 64)
    with pytest.raises(HistoseekError, match="--tokenizer-dir"):
        find_vocab(missing, [tmp_path])
    with pytest.raises(HistoseekError, match="not known"):
        load_tokenizer(TokenizerSpec("sentencepiece", 32, CLIP_VOCAB, spec.vocab_sha256))
