"""The resume journal kept under ``<target>/.iosea-mover/`` while a transfer runs.

One JSON line per element transferred and verified: ``[rel, size, mtime_ns, xxh3-128 hex]`` (``hex``
is ``"link"`` for a symlink). A rerun trusts a line only when the source and the target still have
that size and mtime; any other element already at the target is verified by hashing both sides.
Lines are appended without fsync: the journal only saves work, a lost or torn line only costs a
re-verification, never correctness.
"""

from __future__ import annotations

import contextlib
import json
import os

from iosea_wf.mover.patterns import JOURNAL_DIR

SCHEMA_VERSION = 1
_JOURNAL_FILE = "journal.jsonl"


class Journal:
    """Append-only record of verified elements, readable by the next run on the same target."""

    def __init__(self, target: str, source: str):
        self.dir = os.path.join(target, JOURNAL_DIR)
        self.path = os.path.join(self.dir, _JOURNAL_FILE)
        self.source = source
        self._fd: int | None = None

    def load(self) -> dict[str, tuple[int, int, str]]:
        """Return {rel: (size, mtime_ns, hex)} recorded by an interrupted run from the same source."""
        done: dict[str, tuple[int, int, str]] = {}
        if not os.path.exists(self.path):
            return done
        try:
            with open(self.path, encoding="utf-8", errors="surrogateescape") as f:
                header = json.loads(f.readline() or "{}")
                if header.get("source") != self.source or header.get("schema_version") != SCHEMA_VERSION:
                    return done
                for line in f:
                    try:
                        rel, size, mtime_ns, hexdigest = json.loads(line)
                    except ValueError:
                        continue  # a line torn by kill -9: that element is re-verified instead
                    done[rel] = (size, mtime_ns, hexdigest)
        except (OSError, ValueError):
            pass
        return done

    def open(self) -> None:
        """Start (or continue) the journal of this run."""
        os.makedirs(self.dir, exist_ok=True)
        fresh = not os.path.exists(self.path) or not self.load_header_matches()
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | (os.O_TRUNC if fresh else 0)
        self._fd = os.open(self.path, flags, 0o600)
        if fresh:
            header = f'{{"schema_version": {SCHEMA_VERSION}, "source": {_quote(self.source)}}}\n'
            os.write(self._fd, header.encode("utf-8", "surrogateescape"))

    def load_header_matches(self) -> bool:
        """Return whether the existing journal was written for this source and schema."""
        try:
            with open(self.path, encoding="utf-8", errors="surrogateescape") as f:
                header = json.loads(f.readline() or "{}")
        except (OSError, ValueError):
            return False
        return header.get("source") == self.source and header.get("schema_version") == SCHEMA_VERSION

    def append(self, records: list[tuple[str, int, int, str]]) -> None:
        """Append verified elements in one write (a torn tail is tolerated by :meth:`load`).

        Worker processes share the descriptor (O_APPEND), so each batch lands as one write.
        """
        if self._fd is None or not records:
            return
        text = "".join(f'[{_quote(rel)}, {size}, {mtime}, "{hexd}"]\n' for rel, size, mtime, hexd in records)
        os.write(self._fd, text.encode("utf-8", "surrogateescape"))

    def close(self) -> None:
        """Close the journal, keeping it for the next run."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def remove(self) -> None:
        """Close and delete the journal directory (the run ended: nothing to resume)."""
        self.close()
        for remove, path in ((os.unlink, self.path), (os.rmdir, self.dir)):
            with contextlib.suppress(OSError):
                remove(path)


def _quote(text: str) -> str:
    """Return ``text`` as a JSON string; the common case (printable ASCII) without the json module."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'
    return json.dumps(text)
