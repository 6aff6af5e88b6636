"""Errors and drop/change accounting shared by every reader in `value_jax.data`.

Readers never drop or alter an input item without saying so: each one takes an optional
`DataReport` and counts there every phrase, box, image or line it leaves out or changes, with a
few examples. Malformed input (something a reader cannot interpret) raises `DataFormatError`
naming the file, the 1-based line or the key, what was expected and what was found.

One line numbering everywhere: a line cited in a `DataFormatError` or a report example is
1-based, as an editor shows it, and examples write it `<file name>:<line>` (`file_line`), e.g.
`36979.txt:3`, `past_present.txt:12`, `val.txt:4`.
"""

from __future__ import annotations

import os
from typing import Optional, Union

PathLike = Union[str, "os.PathLike[str]"]


class DataFormatError(ValueError):
    """A data file does not follow its format.

    Message layout: `<path>:<line>: <found> (expected <expected>)`, or `<path> [<key>]: ...` when
    the place is a key or an entry index (JSON, XML) rather than a line, e.g.
    `Sentences/36979.txt:3: unclosed phrase '[/EN#137644/people A group' (expected ']')`.

    Attributes:
      path: the file, as given to the reader.
      line: 1-based line number, or None.
      key: entry index / key path (e.g. `[3].relationships[7].subject`), or None.
      expected: what the format requires there.
      found: what the file holds there.
    """

    def __init__(
        self,
        path: PathLike,
        found: str,
        expected: str,
        *,
        line: Optional[int] = None,
        key: Optional[str] = None,
    ):
        self.path = os.fspath(path)
        self.line = line
        self.key = key
        self.expected = expected
        self.found = found
        where = self.path
        if line is not None:
            where += f":{line}"
        if key is not None:
            where += f" [{key}]"
        super().__init__(f"{where}: {found} (expected {expected})")


class NoExamplesError(ValueError):
    """Nothing is left to run on after reading and filtering the data.

    Raised by the loaders (`CorefLoader`, `RelationLoader`, `SentEvalLoader`) instead of handing
    an empty loader to the probes, whose accumulators would then fail far from the cause. The
    message says "no examples left", names what was read, and lists the data report's summary
    lines so the caller sees what was dropped and why.

    Attributes:
      what: the data that was read (e.g. `Flickr30k Entities val split of <root>`).
      report: the `DataReport` with every count made while reading.
    """

    def __init__(self, what: str, report: "DataReport", hint: str = ""):
        self.what = what
        self.report = report
        lines = report.summary_lines()
        msg = f"no examples left from {what}"
        if hint:
            msg += f" ({hint})"
        msg += " after reading and filtering."
        msg += (
            ("\nData report:\n  " + "\n  ".join(lines))
            if lines
            else "\nData report: nothing counted."
        )
        super().__init__(msg)


class DataReport:
    """Named counts of dropped / changed items, each with its first few examples.

    Counter-like: `report["phrases_without_box"]` is 0 for a name never counted. Readers call
    `count(name, example=...)`; experiments write `to_dict()` next to their results and print
    `summary_lines()`.
    """

    def __init__(self, max_examples: int = 3):
        self.max_examples = max_examples
        self._counts: dict[str, int] = {}
        self._examples: dict[str, list[str]] = {}

    def count(self, name: str, n: int = 1, example: object = None) -> None:
        """Adds `n` to counter `name`; keeps `example` (as str) if fewer than max_examples held."""
        self._counts[name] = self._counts.get(name, 0) + n
        examples = self._examples.setdefault(name, [])
        if example is not None and len(examples) < self.max_examples:
            examples.append(str(example))

    def __getitem__(self, name: str) -> int:
        return self._counts.get(name, 0)

    def __contains__(self, name: str) -> bool:
        return name in self._counts

    def __iter__(self):
        return iter(sorted(self._counts))

    def __len__(self) -> int:
        return len(self._counts)

    def __eq__(self, other) -> bool:
        return isinstance(other, DataReport) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"DataReport({dict(sorted(self._counts.items()))})"

    def examples(self, name: str) -> list[str]:
        return list(self._examples.get(name, []))

    def merge(self, other: "DataReport") -> "DataReport":
        """Adds `other`'s counts (and examples, up to max_examples) into self; returns self."""
        for name in other:
            self._counts[name] = self._counts.get(name, 0) + other[name]
            mine = self._examples.setdefault(name, [])
            for ex in other.examples(name):
                if len(mine) < self.max_examples:
                    mine.append(ex)
        return self

    def to_dict(self) -> dict[str, dict[str, object]]:
        """`{name: {"count": int, "examples": [str, ...]}}`, names sorted (JSON-ready)."""
        return {
            name: {"count": self._counts[name], "examples": list(self._examples.get(name, []))}
            for name in sorted(self._counts)
        }

    @classmethod
    def from_dict(cls, d: dict[str, dict[str, object]], max_examples: int = 3) -> "DataReport":
        """The inverse of `to_dict` (a report stored with prepared data)."""
        report = cls(max_examples)
        for name, entry in d.items():
            report._counts[name] = int(entry["count"])
            report._examples[name] = [str(e) for e in entry.get("examples", [])]
        return report

    def summary_lines(self) -> list[str]:
        """One line per counter: `name: count (e.g. ex1; ex2)`."""
        lines = []
        for name in sorted(self._counts):
            line = f"{name}: {self._counts[name]}"
            if self._examples.get(name):
                line += " (e.g. " + "; ".join(self._examples[name]) + ")"
            lines.append(line)
        return lines


def file_line(path: PathLike, line: int) -> str:
    """`<file name>:<line>` for report examples, `line` 1-based as an editor shows it."""
    return f"{os.path.basename(os.fspath(path))}:{line}"


def report_or_new(report: Optional[DataReport]) -> DataReport:
    """The caller's report, or a throw-away one so readers can count unconditionally."""
    return DataReport() if report is None else report


def read_utf8(path: PathLike) -> str:
    """The whole file as text; bytes that are not UTF-8 raise `DataFormatError` at the 1-based
    line and column where they start (a bare `UnicodeDecodeError` names neither file nor line)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        bad = data[e.start : e.end]
        raise DataFormatError(
            path,
            f"bytes {bad!r} at column {column} that are not UTF-8 ({e.reason})",
            "UTF-8 text",
            line=line,
        ) from None


def read_text_lines(path: PathLike) -> list[str]:
    """UTF-8 lines of a file without their `\\n` / `\\r\\n` ends; one final newline is not a line.

    `str.splitlines` is avoided on purpose: it also splits on `\\x0b`, `\\x1c`, `\\u2028`, ...,
    which would shift every later line number. Non-UTF-8 bytes raise `DataFormatError` at their
    1-based line (`read_utf8`).
    """
    lines = read_utf8(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
