"""List files as sources: the fast split of a plain list and the line-by-line reading agree, and
every malformed line is named with its number."""

import pytest

from beit.shared.images import _list_source, expand_shards, join, source_root

CASES = [
    "a.jpg 1\nb/c.png 2\n",  # labelled
    "a.jpg\nb/c.JPEG\n",  # unlabelled, upper-case suffix
    "a.jpg cat\nb.jpg dog\nc.jpg cat",  # class names, no final newline
    "a.jpg\r\nb.jpg\r\n",  # CRLF
    "x/é.jpg 3\n",  # not ASCII
    "s3://bucket/a.jpg 0\n/abs/b.png 1\n",  # URLs and absolute paths
]


@pytest.mark.parametrize("text", CASES)
def test_the_fast_split_and_the_line_by_line_reading_agree(text):
    fast, slow = _list_source(text, "l.txt", "root"), _list_source(text, "l.txt", "root", fast=False)
    assert (fast.keys, fast.labels, fast.class_names) == (slow.keys, slow.labels, slow.class_names)
    assert len(fast.keys) == len([line for line in text.splitlines() if line.strip()])


@pytest.mark.parametrize(
    "text, message",
    [
        ("a.jpg 1\nb.jpg\n", "l.txt: some lines have a label and some do not"),
        ("a.jpg 1 2\n", "l.txt:1: expected 'path [label]', got 'a.jpg 1 2'"),
        ("a.jpg\nn01440764\n", "l.txt:2: 'n01440764' is not a path to an image"),
        ("a.jpg\x01x.jpg 1\nb.jpg 2\n", "l.txt:1: 'a.jpg\\x01x.jpg' is not a path to an image"),
        ("a.jpg\nb.jpg 2 3\nc.jpg 1\n", "l.txt:2: expected 'path [label]', got 'b.jpg 2 3'"),  # 1 + 3 fields = 2 x 2
        ("a.jpg 1\n  \nb.jpg\n", "l.txt: some lines have a label and some do not"),
        ("", "l.txt lists no images"),
        ("# only a comment\n", "l.txt lists no images"),
    ],
)
def test_a_malformed_list_is_one_sentence_naming_the_line(text, message):
    with pytest.raises(ValueError) as error:
        _list_source(text, "l.txt", "root")
    assert message in str(error.value)


def test_comments_commas_and_blank_lines_are_read_line_by_line():
    source = _list_source("# header\na.jpg,1  # first\n\n b.jpg\t2\n", "l.txt", "root")
    assert source.keys == ["a.jpg", "b.jpg"] and source.labels == [1, 2]


def test_urls_shards_and_roots():
    assert join("s3://b/p", "x/y.jpg") == "s3://b/p/x/y.jpg" and join("s3://b/p", "s3://c/z.jpg") == "s3://c/z.jpg"
    assert source_root("s3://b/p/list.txt") == "s3://b/p" and source_root("s3://b/p/shards-000001.tar") == "s3://b/p"
    assert source_root("s3://b/p/") == "s3://b/p"
    assert expand_shards("d/s-{008..011}.tar") == ["d/s-008.tar", "d/s-009.tar", "d/s-010.tar", "d/s-011.tar"]
    with pytest.raises(ValueError, match="put the .* range in the shards' file name"):
        expand_shards("d/{0..3}/s.tar")
