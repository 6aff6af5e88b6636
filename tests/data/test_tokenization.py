"""WordPiece with word -> piece spans: real bert-base-uncased vocab and generated vocabularies."""

import pathlib

import numpy as np
import pytest

from value_jax.data.errors import DataFormatError, DataReport
from value_jax.data.fixtures.annotations import write_flickr30k, write_vocab
from value_jax.data.flickr30k import parse_sentences
from value_jax.data.tokenization import (
    BERT_BASE_UNCASED_SHA256,
    SPECIAL_TOKENS,
    WordPieceTokenizer,
    file_sha256,
    phrase_piece_span,
    read_vocab,
)

DATA = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data"
VOCAB = DATA / "bert_base_uncased" / "vocab.txt"
SENTENCES = DATA / "flickr30k_entities" / "Sentences"


@pytest.fixture(scope="module")
def uncased():
    if not VOCAB.exists():
        pytest.skip(f"bert-base-uncased vocab.txt not found at {VOCAB}")
    return WordPieceTokenizer(VOCAB, lowercase=True, expected_sha256=BERT_BASE_UNCASED_SHA256)


def _joined(tok, ids):
    return "".join(
        tok.id_to_token(i)[2:] if tok.id_to_token(i).startswith("##") else " " + tok.id_to_token(i)
        for i in ids
    ).strip()


# ---- real vocabulary --------------------------------------------------------------------------


def test_real_vocab_hash_and_specials(uncased):
    assert file_sha256(VOCAB) == BERT_BASE_UNCASED_SHA256
    assert uncased.vocab_size == 30522 and not uncased.vocab_is_cased
    assert uncased.special_ids == {
        "[PAD]": 0,
        "[UNK]": 100,
        "[CLS]": 101,
        "[SEP]": 102,
        "[MASK]": 103,
    }
    assert uncased.vocab["the"] == 1996


def test_real_encode_words(uncased):
    enc = uncased.encode_words("A group of friends playing cards".split(), max_len=32)
    assert enc.ids.tolist() == [101, 1037, 2177, 1997, 2814, 2652, 5329, 102]
    assert enc.word_to_pieces == [(1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7)]
    assert not enc.truncated and enc.num_words_kept == enc.num_words == 6
    enc = uncased.encode_words(["a", "Texas", "A&M", "xenophobic", "player"], max_len=32)
    assert enc.tokens == [
        "[CLS]",
        "a",
        "texas",
        "a",
        "&",
        "m",
        "x",
        "##eno",
        "##phobic",
        "player",
        "[SEP]",
    ]
    assert enc.word_to_pieces == [(1, 2), (2, 3), (3, 6), (6, 9), (9, 10)]
    assert phrase_piece_span(enc, 1, 3) == (2, 9)


def test_real_pieces_equal_whole_sentence_tokenisation_on_flickr(uncased):
    if not SENTENCES.is_dir():
        pytest.skip("real Flickr30k sentences absent")
    for path in sorted(SENTENCES.glob("*.txt")):
        for s in parse_sentences(path):
            enc = uncased.encode_words(s.words, max_len=128)
            whole = uncased._tok.encode(s.text, add_special_tokens=False).ids
            assert enc.ids[1:-1].tolist() == whole
            for p in s.phrases:
                a, b = phrase_piece_span(enc, p.first_word_index, p.num_words)
                assert _joined(uncased, enc.ids[a:b]).replace(" ", "") == p.text.lower().replace(
                    " ", ""
                )


def test_same_ids_as_transformers_bert_tokenizer(uncased):
    transformers = pytest.importorskip("transformers")
    ref = transformers.BertTokenizer(str(VOCAB), do_lower_case=True)
    texts = [
        'Texas A&M xenophobic \u00b4 h * ps caf\u00e9 na\u00efve don \'t " Ugh ... " he mumbled .'
    ]
    if SENTENCES.is_dir():
        texts += [s.text for path in sorted(SENTENCES.glob("*.txt")) for s in parse_sentences(path)]
    senteval = DATA / "senteval_probing" / "past_present.txt"
    if senteval.exists():
        texts += [
            line.split("\t")[2] for line in senteval.read_text(encoding="utf-8").splitlines()[:60]
        ]
    for text in texts:
        assert uncased.encode_words(text.split(" "), 512).ids.tolist() == ref(text)["input_ids"], (
            text
        )


def test_truncation_is_counted_and_spans_kept(uncased):
    words = "A group of friends playing cards and trying to bluff each xenophobic other".split()
    report = DataReport()
    enc = uncased.encode_words(words, max_len=14, report=report)
    assert enc.truncated and len(enc.ids) <= 14 and enc.ids[-1] == 102
    assert (
        enc.num_words_kept == 11 and len(enc.word_to_pieces) == 11
    )  # "xenophobic" (3 pieces) does not fit
    assert (
        report["truncated_sentences"] == 1
        and "11/13 words" in report.examples("truncated_sentences")[0]
    )
    assert phrase_piece_span(enc, 10, 1) == (11, 12)
    assert phrase_piece_span(enc, 10, 2) is None
    with pytest.raises(IndexError):
        phrase_piece_span(enc, 12, 2)
    enc = uncased.encode_words(words, max_len=2)
    assert enc.ids.tolist() == [101, 102] and enc.num_words_kept == 0
    with pytest.raises(ValueError):
        uncased.encode_words(words, max_len=1)


def test_words_without_pieces_and_unknown(uncased):
    report = DataReport()
    enc = uncased.encode_words(["a", "\u200b", "dog", "x" * 101], 32, report)
    assert enc.word_to_pieces == [(1, 2), (2, 2), (2, 3), (3, 4)]
    assert enc.tokens == [
        "[CLS]",
        "a",
        "dog",
        "[UNK]",
        "[SEP]",
    ]  # > 100 characters: [UNK], as in BERT
    assert report["words_without_pieces"] == 1 and report["unknown_pieces"] == 1
    assert phrase_piece_span(enc, 1, 1) is None and phrase_piece_span(enc, 1, 2) == (2, 3)


def test_case_mismatch_refused(uncased):
    with pytest.raises(ValueError, match="uncased but lowercase=False"):
        WordPieceTokenizer(VOCAB, lowercase=False)
    forced = WordPieceTokenizer(VOCAB, lowercase=False, check_case=False)
    assert forced.encode_words(["Dog"], 8).ids.tolist() == [101, 100, 102]


def test_sha_mismatch(tmp_path, uncased):
    with pytest.raises(DataFormatError, match="expected sha256 0000"):
        WordPieceTokenizer(VOCAB, lowercase=True, expected_sha256="0000")


# ---- generated vocabularies -------------------------------------------------------------------


@pytest.mark.parametrize("cased", [False, True])
def test_generated_vocab_covers_fixture_words(tmp_path, cased):
    m = write_flickr30k(tmp_path / "f30k", 4, seed=0)
    tokens = write_vocab(tmp_path / "vocab.txt", m.words, cased=cased)
    assert tokens[:2] == ["[PAD]", "[unused0]"] and tokens[99] == "[unused98]"
    assert tokens[100:104] == list(SPECIAL_TOKENS[1:])
    tok = WordPieceTokenizer(tmp_path / "vocab.txt", lowercase=not cased)
    assert tok.vocab_is_cased == cased
    report = DataReport()
    for sents in m.sentences.values():
        for s in sents:
            enc = tok.encode_words(s.words, 64, report)
            for p in s.phrases:
                a, b = phrase_piece_span(enc, p.first_word_index, p.num_words)
                text = p.text if cased else p.text.lower()
                assert _joined(tok, enc.ids[a:b]).replace(" ", "") == text.replace(" ", "")
    assert len(report) == 0


def test_generated_vocab_wordpiece_continuation(tmp_path):
    path = tmp_path / "vocab.txt"
    write_vocab(path, ["play"], cased=False)
    with open(path, "a") as f:
        f.write("##ing\n")
    tok = WordPieceTokenizer(path, lowercase=True)
    enc = tok.encode_words(["Playing", "play"], 16)
    assert enc.tokens == ["[CLS]", "play", "##ing", "play", "[SEP]"]
    assert enc.word_to_pieces == [(1, 3), (3, 4)]
    enc = tok.encode_words(["plays"], 16)  # falls back to characters, never [UNK]
    assert enc.tokens == ["[CLS]", "play", "##s", "[SEP]"]


def test_bad_vocabularies(tmp_path):
    path = tmp_path / "vocab.txt"
    tokens = write_vocab(path, ["dog"], cased=False)
    path.write_text("\n".join(t.lower() if t in ("[UNK]", "[CLS]") else t for t in tokens) + "\n")
    with pytest.raises(DataFormatError, match=r"vocab\.txt: no \[UNK\], \[CLS\]"):
        WordPieceTokenizer(path, lowercase=True)
    path.write_text("[PAD]\ndog\ncat\ndog\n")
    with pytest.raises(DataFormatError, match=r"vocab\.txt:4: 'dog' again \(first on line 2\)"):
        read_vocab(path)
    path.write_text("[PAD]\n\ncat\n")
    with pytest.raises(DataFormatError, match=r"vocab\.txt:2: an empty line"):
        read_vocab(path)


def test_encoding_ids_dtype(tmp_path):
    path = tmp_path / "vocab.txt"
    write_vocab(path, ["dog"], cased=False)
    enc = WordPieceTokenizer(path, lowercase=True).encode_words([], 8)
    assert enc.ids.dtype == np.int32 and enc.ids.tolist() == [101, 102] and enc.word_to_pieces == []
