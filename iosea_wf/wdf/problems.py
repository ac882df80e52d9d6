"""Collect every problem of a WDF with its place, so all of them are reported at once."""

from __future__ import annotations

import re
from typing import NamedTuple, NoReturn

from ..errors import WDFError
from .model import WDFProblem

# A key path inside the document: mapping keys (str) and list indexes (int).
Path = tuple[str | int, ...]

_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_UNSET = object()


class Mark(NamedTuple):
    """Where a node starts (1-based) and its scalar text as written (None for collections)."""

    line: int
    column: int
    raw: str | None


def format_path(path: Path) -> str:
    """``('steps', 1, 'services', 0)`` -> ``steps[1].services[0]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_KEY.match(part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out


class Problems:
    """The problems found so far in one file, and the marks that place them."""

    def __init__(self, file: str):
        self.file = file
        self.marks: dict[Path, Mark] = {}
        self.key_marks: dict[Path, Mark] = {}
        self.found: list[WDFProblem] = []
        # Paths whose value is already reported as unusable (a bad template): checks that would
        # only repeat the same trouble in other words stay quiet there.
        self.tainted: set[Path] = set()

    def mark_of(self, path: Path, *, key: bool = False) -> Mark | None:
        """The mark of ``path`` (its key's mark if ``key``), else of its nearest marked parent."""
        if key and path in self.key_marks:
            return self.key_marks[path]
        for end in range(len(path), -1, -1):
            mark = self.marks.get(path[:end])
            if mark is not None:
                return mark
        return None

    def add(
        self,
        path: Path,
        message: str,
        expected: str | None = None,
        *,
        key: bool = False,
        value: object = _UNSET,
        place: Path | None = None,
    ) -> None:
        """Record a problem at ``path``, placed at its key with ``key=True``, or at ``place``'s key."""
        if path in self.tainted:
            return
        if place is not None and place in self.key_marks:
            mark: Mark | None = self.key_marks[place]
        else:
            mark = self.mark_of(path, key=key)
        if value is _UNSET:
            own = self.key_marks.get(path) if key else self.marks.get(path)
            value = own.raw if own is not None else None
        self.found.append(
            WDFProblem(
                file=self.file,
                line=mark.line if mark else None,
                column=mark.column if mark else None,
                path=format_path(path),
                value=value if isinstance(value, str) or value is None else str(value),
                message=message,
                expected=expected,
            )
        )

    def add_at(self, line: int | None, column: int | None, message: str, expected: str | None = None) -> None:
        """Record a problem that has a place in the file but no key path (syntax, encoding)."""
        self.found.append(WDFProblem(self.file, line, column, "", None, message, expected))

    def raise_if_any(self) -> None:
        """Raise one WDFError listing every problem, in file order, if any was found."""
        if self.found:
            self.fail()

    def fail(self) -> NoReturn:
        """Raise one WDFError listing every problem found so far, in file order."""
        ordered = sorted(self.found, key=lambda p: (p.line or 0, p.column or 0))
        count = len(ordered)
        raise WDFError(
            f"{self.file}: the workflow description is invalid ({count} problem{'s' if count > 1 else ''})",
            problems=ordered,
        )
