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
