"""Every number the docs quote from an example is the number that example writes.

A quoted number is followed in the Markdown by an HTML comment (invisible once rendered)
naming the JSON the example writes and the field that holds it:

    V_t > 0 on 95% <!-- 08_actor_loss.json: share_positive_values --> of the tokens

A quoted text from an example (a prompt, a response) is marked the same way, right after
its closing quote, and must equal the field's text (whitespace aside):

    the response 'superb. Highly recommended.' <!-- 08_actor_loss.json: example.response -->

The field is a path of keys and list indices separated by dots (``tokens.0.A_t``,
``runs.too large a step.summary.env/kl.max``). The slow test reads the JSON of one
default run of every example (the ``walkthrough_out`` fixture, shared with the exercises'
answers) and checks each number at the precision it is printed with: ``72%`` is 0.72 to
the nearest percent, ``+1.61`` is 1.61 to the nearest hundredth, ``24`` is 24. A number
printed with a percent sign is the field's value times 100.

The Chinese docs (``TRANSLATIONS``) quote the numbers of their English originals, with the
same marks: a fast test checks that each pair carries the same marks, as many times each.

To update the docs after a change to the library or the examples: run the slow test; each
failure names the doc, the field, what the doc says and what the example now writes. Or
let the numbers be rewritten from a default run of the examples, then read the diff (the
words around a number may need to change with it):

    python examples/walkthrough.py --out /tmp/walk
    python -m tests.e2e.test_doc_numbers /tmp/walk
"""

import json
import re
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [
    "docs/concepts.md",
    "docs/concepts.zh.md",
    "docs/metrics.md",
    "docs/metrics.zh.md",
    "docs/deepspeed-chat.md",
    "docs/exercises.md",
    "docs/exercises.zh.md",
    "docs/exercises-answers.md",
    "README.md",
]
TRANSLATIONS = {  # a Chinese doc quotes the same numbers as its English original, each with the same mark
    "docs/concepts.zh.md": "docs/concepts.md",
    "docs/metrics.zh.md": "docs/metrics.md",
    "docs/exercises.zh.md": "docs/exercises.md",
}
MARK = re.compile(r"<!-- (\d\d_\w+\.json): (.+?) -->")
# the number just before a mark: a sign only where no digit precedes it ("0.5-1.7" ends in 1.7, not -1.7)
NUMBER = re.compile(r"(?<![\d.,])([-+]?)(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(%?)\s*$")
TEXT = re.compile(r"'([^']+)'\s*$")  # a quoted text just before a mark


class Quote:
    """One quoted number: where it is (line, and span in the doc's text), what it says, which field it quotes."""

    def __init__(self, doc: str, line: int, text: str, file: str, path: str, span: tuple[int, int] = (0, 0)):
        self.doc, self.line, self.text, self.file, self.path, self.span = doc, line, text, file, path, span

    def __repr__(self) -> str:
        return f"{self.doc}:{self.line}: {self.text!r} <- {self.file}: {self.path}"


def quotes(doc: str, text: str | None = None) -> list[Quote]:
    """Every marked number of a doc (``text``: the doc's text, default read from the repository)."""
    text = (ROOT / doc).read_text() if text is None else text
    found = []
    for mark in MARK.finditer(text):
        line = text.count("\n", 0, mark.start()) + 1
        offset = max(0, mark.start() - 200)
        quoted = TEXT.search(text[offset : mark.start()])
        if quoted:
            span = (offset + quoted.start(), offset + quoted.end(1) + 1)
            found.append(Quote(doc, line, text[slice(*span)], mark.group(1), mark.group(2), span))
            continue
        offset = max(0, mark.start() - 40)
        number = NUMBER.search(text[offset : mark.start()])
        span = (offset + number.start(1), offset + number.end(4)) if number else (mark.start(), mark.start())
        found.append(Quote(doc, line, number.group(0).strip() if number else "", mark.group(1), mark.group(2), span))
    return found


def lookup(data, path: str):
    """data[k1][k2]... for path 'k1.k2...', integer components indexing lists."""
    for key in path.split("."):
        data = data[int(key)] if isinstance(data, list) else data[key]
    return data


def agrees(value, written: str) -> bool:
    """Whether the JSON value, printed as ``written`` is (its sign, decimals and % sign), reads ``written``; a quoted
    text must equal the value's text, whitespace aside."""
    if written.startswith("'"):
        return isinstance(value, str) and written.strip("'").split() == value.split()
    match = NUMBER.search(written)
    sign, whole, fraction, percent = match.groups()
    number = float(sign + whole.replace(",", "") + (fraction or ""))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    value = value * 100 if percent else value
    decimals = len(fraction) - 1 if fraction else 0
    return abs(value - number) <= 0.5 * 10**-decimals + 1e-9 * max(1.0, abs(number))


def printed(value: float, like: str) -> str:
    """``value`` printed as ``like`` is: its decimals, an explicit + if it has one, a % sign, thousands commas."""
    sign, whole, fraction, percent = NUMBER.search(like).groups()
    decimals = len(fraction) - 1 if fraction else 0
    value = value * 100 if percent else value
    spec = ("+" if sign == "+" else "") + ("," if "," in whole else "") + f".{decimals}f"
    return f"{value:{spec}}" + percent


def rewrite(out: Path) -> list[str]:
    """Rewrite every marked number of the docs from the JSON in ``out``; return what changed."""
    changes, loaded = [], {}
    for doc in DOCS:
        text = original = (ROOT / doc).read_text()
        for quote in reversed(quotes(doc, text)):  # from the end, so earlier spans stay valid
            data = loaded.setdefault(quote.file, json.loads((out / quote.file).read_text()))
            value = lookup(data, quote.path)
            if not agrees(value, quote.text):
                new = f"'{value.strip()}'" if quote.text.startswith("'") else printed(value, quote.text)
                text = text[: quote.span[0]] + new + text[quote.span[1] :]
                changes.append(f"{doc}:{quote.line}: {quote.text} -> {new}  ({quote.file}: {quote.path})")
        if text != original:
            (ROOT / doc).write_text(text)
    return changes[::-1]


def test_the_checker_catches_a_drift():
    doc = "rose on 72% <!-- 08_actor_loss.json: naive.share_rising_negative --> and on 0.5-1.7 <!-- 13_x.json: a.1 -->"
    first, second = quotes("docs/concepts.md", doc)
    assert (first.text, first.file, first.path) == ("72%", "08_actor_loss.json", "naive.share_rising_negative")
    assert second.text == "1.7" and lookup({"a": [0, 1.66]}, second.path) == 1.66
    assert agrees(0.7241, first.text) and not agrees(0.70, first.text) and not agrees(0.7251, first.text)
    assert agrees(1.66, second.text) and not agrees(1.76, second.text)
    assert agrees(-0.204, "-0.2") and not agrees(0.204, "-0.2") and agrees(1024, "1,024") and not agrees(24.6, "24")
    assert not agrees(True, "1")
    assert printed(0.7012, "72%") == "70%" and printed(-1.734, "+1.61") == "-1.73" and printed(2048, "1,024") == "2,048"
    assert first.span == (8, 11) and doc[slice(*first.span)] == "72%"
    (quote,) = quotes("docs/concepts.md", "the response 'superb. Highly\nrecommended.' <!-- 08_x.json: r -->")
    assert agrees(" superb. Highly recommended.", quote.text) and not agrees(" superb.", quote.text)


@pytest.mark.parametrize("doc", DOCS)
def test_every_mark_follows_a_number_and_names_an_example(doc):
    examples = {p.stem for p in (ROOT / "examples").glob("[0-9][0-9]_*.py")}
    for quote in quotes(doc):
        assert quote.text, f"a mark that follows no number: {quote}"
        assert quote.file.removesuffix(".json") in examples, f"no example writes {quote.file}: {quote}"


def test_the_teaching_docs_mark_their_numbers():
    """The docs that quote the examples do mark what they quote (a floor, against marks lost in an edit)."""
    counts = {doc: len(quotes(doc)) for doc in DOCS}
    floors = {"docs/concepts.md": 100, "docs/metrics.md": 30, "docs/exercises.md": 2}
    floors |= {chinese: floors[english] for chinese, english in TRANSLATIONS.items()}
    for doc, floor in floors.items():
        assert counts[doc] >= floor, counts


@pytest.mark.parametrize("chinese", TRANSLATIONS)
def test_the_chinese_docs_quote_what_the_english_ones_quote(chinese):
    """The same marks, as many times each, in a Chinese doc as in its English original: a number added to (or
    dropped from) one of them is added to (or dropped from) the other. Their values are checked by the slow test."""
    english = TRANSLATIONS[chinese]
    marks = {doc: Counter((q.file, q.path) for q in quotes(doc)) for doc in (english, chinese)}
    missing, extra = marks[english] - marks[chinese], marks[chinese] - marks[english]
    assert not missing and not extra, f"{chinese} vs {english}: missing {sorted(missing)}, extra {sorted(extra)}"


@pytest.mark.slow
def test_quoted_numbers_match_the_examples(walkthrough_out):
    loaded, wrong = {}, []
    for doc in DOCS:
        for quote in quotes(doc):
            data = loaded.setdefault(quote.file, json.loads((walkthrough_out / quote.file).read_text()))
            try:
                value = lookup(data, quote.path)
            except (KeyError, IndexError, ValueError, TypeError):
                wrong.append(f"{quote}: no such field")
                continue
            if not agrees(value, quote.text):
                wrong.append(f"{quote}: the example writes {value!r}")
    assert not wrong, "numbers in the docs that the examples no longer produce:\n" + "\n".join(wrong)


if __name__ == "__main__":
    import sys

    for change in rewrite(Path(sys.argv[1])):
        print(change)
