"""BERT WordPiece over pre-split words, keeping every word's word-piece span.

UNITER uses bert-base-cased (`lowercase=False`), LXMERT bert-base-uncased (`lowercase=True`).
The pipeline matches BERT's: BertNormalizer (clean text, CJK spacing, lower-casing and accent
stripping when uncased) -> BertPreTokenizer (whitespace + punctuation) -> WordPiece with `##`
continuations and `[UNK]` for words over 100 characters.

Words are encoded as a pre-tokenised sequence, so `tokenizers` reports which input word every
piece came from: a Flickr30k phrase's word span maps to a piece span without re-joining `##`
pieces (VOLTA's way, which breaks when a word normalises to something else).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Optional, Sequence

import numpy as np
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from value_jax.data.errors import (
    DataFormatError,
    DataReport,
    PathLike,
    read_text_lines,
    report_or_new,
)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# Hash of the original Google/Hugging Face bert-base-uncased vocab.txt (30,522 lines). Edited
# copies (lower-cased specials, changed [unusedN]) circulate; check against this one.
BERT_BASE_UNCASED_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"


def file_sha256(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_vocab(path: PathLike) -> dict[str, int]:
    """`vocab.txt`: token -> line index (0-based). Empty or repeated tokens raise at file:line."""
    vocab: dict[str, int] = {}
    for i, tok in enumerate(read_text_lines(path)):
        if not tok:
            raise DataFormatError(path, "an empty line", "one WordPiece token per line", line=i + 1)
        if tok in vocab:
            raise DataFormatError(
                path,
                f"{tok!r} again (first on line {vocab[tok] + 1})",
                "each token once",
                line=i + 1,
            )
        vocab[tok] = i
    return vocab


@dataclasses.dataclass
class Encoding:
    """`[CLS] pieces [SEP]` of the kept words.

    Attributes:
      ids: `[L]` int32, L <= max_len.
      tokens: the L piece strings.
      word_to_pieces: per kept word, its half-open `(start, end)` in `ids` (so >= 1: [CLS] is 0);
        empty (start == end) for a word BERT's normaliser deletes entirely.
      truncated: True when words were dropped to fit max_len.
      num_words_kept: words fully inside the sequence (truncation is at word boundaries).
      num_words: words given.
    """

    ids: np.ndarray
    tokens: list[str]
    word_to_pieces: list[tuple[int, int]]
    truncated: bool
    num_words_kept: int
    num_words: int


def phrase_piece_span(
    encoding: Encoding, first_word: int, num_words: int
) -> Optional[tuple[int, int]]:
    """Half-open piece span of words `[first_word, first_word + num_words)`; None when truncation
    removed any of them or they have no piece at all. Raises IndexError for a span outside the
    encoded words."""
    end_word = first_word + num_words
    if first_word < 0 or num_words < 1 or end_word > encoding.num_words:
        raise IndexError(
            f"word span [{first_word}, {end_word}) outside the {encoding.num_words} words"
        )
    if end_word > encoding.num_words_kept:
        return None
    start, end = encoding.word_to_pieces[first_word][0], encoding.word_to_pieces[end_word - 1][1]
    return (start, end) if end > start else None


class WordPieceTokenizer:
    """BERT WordPiece from a user's `vocab.txt`.

    Args:
      vocab_path: one token per line, line index = id.
      lowercase: True for uncased vocabularies (LXMERT), False for cased (UNITER).
      expected_sha256: if given, the vocab file must hash to it.
      check_case: refuse `lowercase` that contradicts the vocabulary (a cased vocab has tokens with
        ASCII capitals, an uncased one has none): the wrong setting silently turns capitalised
        words into [UNK] or drops case information.
    """

    def __init__(
        self,
        vocab_path: PathLike,
        lowercase: bool,
        expected_sha256: Optional[str] = None,
        check_case: bool = True,
    ):
        if expected_sha256 is not None:
            got = file_sha256(vocab_path)
            if got != expected_sha256:
                raise DataFormatError(vocab_path, f"sha256 {got}", f"sha256 {expected_sha256}")
        self.vocab = read_vocab(vocab_path)
        missing = [t for t in SPECIAL_TOKENS if t not in self.vocab]
        if missing:
            raise DataFormatError(
                vocab_path,
                f"no {', '.join(missing)}",
                f"all special tokens {', '.join(SPECIAL_TOKENS)}",
            )
        self.lowercase = lowercase
        self.vocab_is_cased = any(
            any("A" <= c <= "Z" for c in t)
            for t in self.vocab
            if not (t.startswith("[") and t.endswith("]"))
        )
        if check_case and self.vocab_is_cased == lowercase:
            kind = "cased" if self.vocab_is_cased else "uncased"
            raise ValueError(
                f"{vocab_path}: the vocabulary is {kind} but lowercase={lowercase}; pass "
                f"lowercase={not self.vocab_is_cased} (or check_case=False to force)"
            )
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
            self.vocab[t] for t in SPECIAL_TOKENS
        )
        self._inv = {i: t for t, i in self.vocab.items()}
        tok = Tokenizer(
            models.WordPiece(vocab=self.vocab, unk_token="[UNK]", max_input_chars_per_word=100)
        )
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
        )
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        self._tok = tok

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def special_ids(self) -> dict[str, int]:
        return {t: self.vocab[t] for t in SPECIAL_TOKENS}

    def id_to_token(self, i: int) -> str:
        return self._inv[int(i)]

    def word_pieces(
        self, words: Sequence[str], report: Optional[DataReport] = None
    ) -> list[list[int]]:
        """Piece ids of each word (no specials), exactly as BERT tokenises the joined sentence.
        A word that yields no piece (only control / zero-width characters, which BERT's
        normaliser deletes) keeps an empty list, counted as `words_without_pieces`: inserting
        anything would change the model's input. Counts `unknown_pieces` ([UNK] pieces)."""
        report = report_or_new(report)
        words = list(words)
        per_word: list[list[int]] = [[] for _ in words]
        if words:
            enc = self._tok.encode(words, is_pretokenized=True, add_special_tokens=False)
            for i, w in zip(enc.ids, enc.word_ids):
                per_word[w].append(i)
                if i == self.unk_id:
                    report.count("unknown_pieces", example=repr(words[w]))
        for k, pieces in enumerate(per_word):
            if not pieces:
                report.count("words_without_pieces", example=repr(words[k]))
        return per_word

    def encode_words(
        self, words: Sequence[str], max_len: int, report: Optional[DataReport] = None
    ) -> Encoding:
        """`[CLS] pieces(w0) pieces(w1) ... [SEP]`, at most `max_len` ids including both specials.

        Truncation keeps whole words only, so every kept word has its full span; a truncated
        sentence is counted as `truncated_sentences` (example: words kept / given).
        """
        if max_len < 2:
            raise ValueError(f"max_len must leave room for [CLS] and [SEP], got {max_len}")
        report = report_or_new(report)
        per_word = self.word_pieces(words, report)
        budget = max_len - 2
        ids = [self.cls_id]
        spans = []
        for pieces in per_word:
            if len(ids) - 1 + len(pieces) > budget:
                break
            spans.append((len(ids), len(ids) + len(pieces)))
            ids.extend(pieces)
        ids.append(self.sep_id)
        kept = len(spans)
        truncated = kept < len(per_word)
        if truncated:
            report.count(
                "truncated_sentences",
                example=f"{kept}/{len(per_word)} words: {' '.join(words)[:60]!r}",
            )
        return Encoding(
            np.array(ids, np.int32),
            [self._inv[i] for i in ids],
            spans,
            truncated,
            kept,
            len(per_word),
        )
