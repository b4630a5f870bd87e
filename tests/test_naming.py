"""Output names: safe, unique, stable."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from runner.naming import MAX_COMPONENT, docs_from_rels, output_stem_for


def test_plain_names_are_mirrored():
    assert output_stem_for("a/b/report.pdf") == "a/b/report"
    assert output_stem_for("Report.PDF") == "Report"


def test_traversal_and_absolute_never_escape():
    for rel in ("../../etc/passwd.pdf", "/abs/x.pdf", "a/../../b.pdf", "..\\..\\win.pdf"):
        stem = output_stem_for(rel)
        assert not stem.startswith("/")
        assert ".." not in stem.split("/")


def test_odd_unicode_and_long_names():
    stem = output_stem_for("dir/re\u202eport\x00\u200b.pdf")
    assert "\u202e" not in stem and "\x00" not in stem and "\u200b" not in stem
    long = output_stem_for("x" * 1000 + ".pdf")
    assert all(len(c.encode()) <= MAX_COMPONENT for c in long.split("/"))


def test_distinct_inputs_never_share_an_output():
    rels = ["a/x.pdf", "a/x.PDF", "a/../a/x.pdf", "a/x?.pdf", "a/x_.pdf", "a/x*.pdf", "A/x.pdf"]
    stems = [d.output_stem.lower() for d in docs_from_rels(rels)]
    assert len(stems) == len(set(stems))


@given(st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=20, unique=True))
def test_property_unique_and_contained(names):
    rels = [n + ".pdf" for n in names]
    docs = docs_from_rels(rels)
    stems = [d.output_stem.lower() for d in docs]
    assert len(set(stems)) == len(set(rels))
    for s in stems:
        assert not s.startswith("/") and ".." not in s.split("/") and "\x00" not in s
