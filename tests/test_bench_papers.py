"""The papers' numbers (mm_jupyter/bench/paper_numbers.toml): a valid file, every entry printed in the paper
it names, no sentence of a paper copied, and the comparisons the reports make with them."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from mm_jupyter.bench import papers as P

#: where the papers' text files lie (the course's shared folder beside the checkout)
PAPERS_DIR = Path(os.environ.get("MM_JUPYTER_PAPERS", Path(__file__).resolve().parents[2] / "shared" / "papers"))
FILES = {"mmm": "efficient-multi-model-management.txt", "alsatian": "alsatian-model-search.txt",
         "lecture": "lecture-model-management-and-inference.txt"}
WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 8: "eight", 10: "ten", 12: "twelve",
         18: "eighteen"}


def _text(name: str) -> str:
    path = PAPERS_DIR / FILES[name]
    if not path.exists():
        pytest.skip(f"the papers' text files are not at {PAPERS_DIR} (set MM_JUPYTER_PAPERS)")
    return path.read_text(encoding="utf-8")


def _forms(v: float) -> set[str]:
    """How a paper may print ``v``: 4,993 / 4993 / 99.9 / 0.001 / 342M / six / 2000 as 2,000."""
    out = {f"{v:g}", f"{v:.1f}", f"{v:,.1f}"}
    if v.is_integer():
        out |= {str(int(v)), f"{int(v):,}"}
        if int(v) in WORDS:
            out.add(WORDS[int(v)])
        if v >= 1e6 and v % 1e6 == 0:
            out.add(f"{int(v // 1e6)}M")
    return out


def test_the_file_loads_with_unique_ids_and_every_field() -> None:
    numbers = P.numbers()
    assert len(numbers) >= 140
    assert len({n.id for n in numbers}) == len(numbers)
    assert {n.paper for n in numbers} == set(P.PAPERS)
    for n in numbers:
        assert n.id.startswith(f"{n.paper}.") and n.unit in P.UNITS and n.source in P.SOURCES
        assert (n.value is None) == (n.low is not None and n.high is not None)
    # the headline numbers of both papers are there
    assert P.number("alsatian.fig10.max_vs_shift").value == 10.7
    assert P.number("alsatian.table1.vit_l_32_params").value == 306_535_400
    assert P.number("mmm.fig3.mmlib_overhead_mb").value == 40.4
    assert P.number("alsatian.fig10.top50_2000").text() == "3-4x"
    assert P.number("mmm.fig3.u1_parameter_mb").text() == "~99.9 MB"
    assert set(P.paper_info()) == {"mmm", "alsatian"}


@pytest.mark.parametrize("paper", ["mmm", "alsatian"])
def test_every_number_is_printed_in_its_paper(paper: str) -> None:
    """Typing errors are caught: each value (or both ends of a range) occurs in the paper's text (or, for
    the few values from the talk's slides, in the lecture)."""
    texts = {"text": _text(paper), "table": _text(paper), "lecture": _text("lecture")}
    missing = []
    for n in P.numbers(paper):
        body = texts[n.source]
        for v in ([n.value] if n.value is not None else [n.low, n.high]):
            assert v is not None
            if not any(re.search(rf"(?<![\d.,]){re.escape(f)}(?![\d,]|\.\d)", body) for f in _forms(v)):
                missing.append(f"{n.id}: {v:g}")
    assert not missing, f"not printed in the {paper} paper: {missing}"


@pytest.mark.parametrize("paper", ["mmm", "alsatian"])
def test_no_sentence_of_the_paper_is_copied(paper: str) -> None:
    """Claims are our own words: no run of six words of a claim (other than six numbers) occurs in the paper."""
    def words(s: str) -> list[str]:
        return re.findall(r"[a-z0-9]+", s.lower())

    body = " " + " ".join(words(_text(paper))) + " "
    copied = []
    for n in P.numbers(paper):
        w = words(n.claim)
        for i in range(len(w) - 5):
            run = w[i:i + 6]
            if not all(x.isdigit() for x in run) and f" {' '.join(run)} " in body:  # a list of numbers is data
                copied.append(f"{n.id}: {' '.join(w[i:i + 6])!r}")
                break
    assert not copied, copied


def test_matches_follows_the_papers_qualifier() -> None:
    up_to, more, approx, less = (P.number(i) for i in ("alsatian.fig10.max_vs_shift", "alsatian.fig17.vs_base",
                                                        "mmm.fig3.u1_parameter_mb", "alsatian.sec43.feature_kb"))
    # "up to 10.7x" is the largest speed-up seen: reproduced by reaching it, within the tolerance
    assert up_to.matches(10.7) and not up_to.matches(3.4) and not up_to.matches(11.0)
    assert up_to.matches(11.0, tolerance=0.05) and up_to.matches(9.0, tolerance=0.2)
    assert more.matches(20.0) and not more.matches(13.0) and more.matches(13.0, tolerance=0.1)
    assert less.matches(2.0) and not less.matches(12.0) and less.matches(10.5, tolerance=1.0, absolute=True)
    assert approx.matches(99.86, tolerance=0.01) and not approx.matches(90.0, tolerance=0.05)
    assert approx.matches(99.5, tolerance=0.5, absolute=True) and not approx.matches(99.3, tolerance=0.5,
                                                                                     absolute=True)
    rng = P.number("alsatian.fig10.top50_2000")
    assert rng.matches(3.5) and not rng.matches(2.5) and rng.matches(2.9, tolerance=0.05) and rng.centre == 3.5


GOOD = """
[[number]]
id = "mmm.x"
paper = "mmm"
artefact = "Fig. 3"
where = "Sec. 4.2"
series = "s"
setting = "t"
value = 1.5
relation = "="
unit = "MB"
source = "text"
claim = "c"
"""


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace('claim = "c"\n', ""), "missing or empty claim"),
    (lambda t: t + t, "defined twice"),
    (lambda t: t.replace('unit = "MB"', 'unit = "furlongs"'), "unknown unit"),
    (lambda t: t.replace('relation = "="', 'relation = "about"'), "relation 'about'"),
    (lambda t: t.replace("value = 1.5", "value = 1.5\nlow = 1.0\nhigh = 2.0"), "either value, or low < high"),
    (lambda t: t.replace("value = 1.5", "low = 2.0\nhigh = 1.0"), "either value, or low < high"),
    (lambda t: t.replace("value = 1.5", 'value = "1.5"'), "finite number"),
    (lambda t: t.replace('source = "text"', 'source = "read from plot"'), "states its precision"),
    (lambda t: t.replace('id = "mmm.x"', 'id = "alsatian.x"'), "must start with 'mmm.'"),
    (lambda t: t.replace('claim = "c"', 'claim = "c"\nnote = "n"'), "unknown field(s) note"),
    (lambda t: t.replace("[[number]]", "[[number]"), "not valid TOML"),
])
def test_a_malformed_file_names_the_entry_and_the_problem(edit, message) -> None:  # type: ignore[no-untyped-def]
    assert P.parse(GOOD)["mmm.x"].value == 1.5
    with pytest.raises(P.PaperNumbersError, match=re.escape(message)):
        P.parse(edit(GOOD))


def test_a_plot_reading_states_its_precision() -> None:
    text = GOOD.replace('source = "text"', 'source = "read from plot"\nprecision = 0.5')
    assert P.parse(text)["mmm.x"].precision == 0.5


def test_an_unknown_id_is_a_clear_error() -> None:
    with pytest.raises(P.PaperNumbersError, match="no paper number 'mmm.nope'"):
        P.number("mmm.nope")
