"""DataReport, DataFormatError and NoExamplesError: the messages people read."""

import pytest

from value_jax.data.errors import DataFormatError, DataReport, NoExamplesError


def test_no_examples_error_says_so_and_lists_the_report():
    report = DataReport()
    report.count("images_without_features", 2, example="feats.tsv: 1000092795")
    err = NoExamplesError("Flickr30k Entities val split", report, "max_images=0")
    assert isinstance(err, ValueError)
    assert err.report is report
    text = str(err)
    assert "no examples left" in text and "max_images=0" in text
    assert "images_without_features: 2 (e.g. feats.tsv: 1000092795)" in text


def test_no_examples_error_with_empty_report():
    assert "nothing counted" in str(NoExamplesError("x", DataReport()))


def test_data_format_error_layout():
    err = DataFormatError("a/b.txt", "found x", "y", line=3)
    assert str(err) == "a/b.txt:3: found x (expected y)"
    with pytest.raises(ValueError):
        raise err


# ---- every text reader: non-UTF-8 bytes and 1-based lines --------------------------------------

from value_jax.data.flickr30k import parse_sentences, read_split, read_unrelated_captions  # noqa: E402
from value_jax.data.senteval import read_probing_task  # noqa: E402
from value_jax.data.tokenization import read_vocab  # noqa: E402
from value_jax.data.visual_genome import read_relations_vocab  # noqa: E402

# Three lines per reader; the third holds a Latin-1 byte (0xe9, "é") where UTF-8 is required.
NON_UTF8 = {
    "36979.txt": (
        parse_sentences,
        [b"[/EN#1/people A man] sits .", b"A man sits .", b"[/EN#1/people A caf\xe9 owner] sits ."],
    ),
    "past_present.txt": (
        read_probing_task,
        [b"tr\tPAST\tHe ran .", b"va\tPRES\tHe runs .", b"te\tPAST\tThe caf\xe9 closed ."],
    ),
    "val.txt": (read_split, [b"1000092795", b"10002456", b"1\xe9"]),
    "UNRELATED_CAPTIONS": (read_unrelated_captions, [b"# format", b"1000092795 2", b"1\xe9 1"]),
    "vocab.txt": (read_vocab, [b"[PAD]", b"on", b"caf\xe9"]),
    "relations_vocab.txt": (read_relations_vocab, [b"on,on top of", b"in", b"caf\xe9"]),
}


@pytest.mark.parametrize("name", sorted(NON_UTF8))
def test_non_utf8_bytes_raise_at_file_and_line(tmp_path, name):
    # Before: a bare UnicodeDecodeError naming neither the file nor the line.
    read, lines = NON_UTF8[name]
    path = tmp_path / name
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataFormatError) as err:
        read(path)
    column = lines[2].index(b"\xe9") + 1
    assert (
        str(err.value).startswith(f"{path}:3: bytes b'\\xe9' at column {column} ")
        and err.value.line == 3
    )
    assert "UTF-8" in str(err.value)


def test_one_based_lines_in_sentences_senteval_and_split_readers(tmp_path):
    """Line 3 of each file is the odd one; every error and report example says 3."""
    report = DataReport()
    sentences = tmp_path / "36979.txt"
    sentences.write_text(
        "[/EN#1/people A man] sits .\n[/EN#2/bodyparts/people A hand] waves .\n\n"
        "[/EN#3/robots A robot] walks .\n"
    )
    parse_sentences(sentences, report)
    assert report.examples("blank_caption_lines") == ["36979.txt:3"]
    assert report.examples("multi_type_phrases") == ["36979.txt:2 bodyparts/people"]
    assert report.examples("unknown_phrase_types") == ["36979.txt:4 robots"]
    sentences.write_text("A man sits .\nA man sits .\n[/EN#1/people A man sits .\n")
    with pytest.raises(DataFormatError, match=r"36979\.txt:3: unclosed phrase"):
        parse_sentences(sentences)

    senteval = tmp_path / "past_present.txt"
    senteval.write_text("tr\tPAST\tHe ran .\nva\tPRES\tHe runs .\n\nte\tPAST\tHe  ran .\n")
    data = read_probing_task(senteval, report=report)
    assert report.examples("blank_lines") == ["past_present.txt:3"]
    assert report.examples("repeated_spaces") == ["past_present.txt:4"]
    assert data.splits["te"].line_numbers.tolist() == [4]
    senteval.write_text("tr\tPAST\tHe ran .\nva\tPRES\tHe runs .\nte\tPAST\n")
    with pytest.raises(DataFormatError, match=r"past_present\.txt:3: 2 tab-separated fields"):
        read_probing_task(senteval)

    split = tmp_path / "val.txt"
    split.write_text("12\n34\n\n12\n")
    split_report = DataReport()
    read_split(split, split_report)
    assert split_report.examples("blank_lines") == ["val.txt:3"]
    assert split_report.examples("duplicate_image_ids") == ["val.txt:4 12"]
    split.write_text("12\n34\nx5\n")
    with pytest.raises(DataFormatError, match=r"val\.txt:3: 'x5'"):
        read_split(split)
