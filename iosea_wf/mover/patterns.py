"""Resolve a mover's glob patterns under the source directory into the plan of elements to transfer.

Pattern rules (``fnmatch`` per path component, so a leading dot is not special):

* patterns are relative to the source; ``*``, ``?`` and ``[...]`` match inside one component, a
  component that is exactly ``**`` matches any number of directories (zero included);
* a matched directory is taken recursively; a matched file or symlink is taken as is;
* absolute patterns, ``..`` components, and a pattern whose literal part goes through or names a
  symlink that points outside the source are refused (:class:`MoverUsageError`, nothing is done);
* symlinks are never followed while walking: every directory is listed through a descriptor
  opened beneath the source's (:func:`dirs.open_dir`), so one swapped for a symlink is an error;
  a symlink found by a wildcard or inside a matched directory is copied as a symlink when it
  resolves inside the source, and reported as a per-file error otherwise;
* FIFOs, sockets and devices are reported as per-file errors (opening a FIFO would block forever);
* the mover's own journal directory and temporary files are never matched (a target inside the
  source is refused before planning; the plan records the ``(st_dev, st_ino)`` of every source
  directory and file, so that another path into the source is recognised at the target).
"""

from __future__ import annotations

import fnmatch
import os
import re
import stat
from collections.abc import Callable, Iterator

from iosea_wf.mover import dirs
from iosea_wf.mover.errors import MoverUsageError

JOURNAL_DIR = ".iosea-mover"
TEMP_MARK = ".iosea-tmp-"
# A temporary file: ``.<name>.iosea-tmp-<run id>-<worker and sequence>``; the run id (16 hex digits)
# says which run made it, so a mover only ever removes temporaries of its own or of a dead run.
TEMP_RE = re.compile(r"\A\..*\.iosea-tmp-([0-9a-f]{16})-[0-9a-f]+\Z", re.S)
_MAGIC = re.compile(r"[*?\[]")
_MOVER_FILES = frozenset({"journal.jsonl", "record.jsonl"})  # what a mover keeps in JOURNAL_DIR


# Plain classes, not dataclasses: importing dataclasses (and inspect behind it) is a measurable part
# of the mover's start-up, which matters when a transfer of small files takes a second or two.
class Entry:
    """One element to transfer: a regular file or a symlink, by its path relative to the source."""

    __slots__ = ("rel", "kind", "size", "mtime_ns", "mode", "link", "ino", "ctime_ns", "dev", "nlink")

    def __init__(
        self,
        rel: str,
        kind: str,
        size: int,
        mtime_ns: int,
        mode: int = 0o644,
        link: str | None = None,
        st: os.stat_result | None = None,
    ):
        self.rel = rel
        self.kind = kind  # "file" or "link"
        self.size = size
        self.mtime_ns = mtime_ns
        self.mode = mode  # permission bits
        self.link = link  # symlink text to create at the target (absolute ones made relative)
        # Identity when planned: a source is deleted only if it is still this inode, unchanged.
        self.dev, self.ino = (st.st_dev, st.st_ino) if st is not None else (0, 0)
        self.ctime_ns = st.st_ctime_ns if st is not None else 0
        self.nlink = st.st_nlink if st is not None else 1

    def identity(self) -> tuple[int, int, int, int, int]:
        """(inode, size, mtime, ctime, links) as planned: what a source must still have to be deleted."""
        return (self.ino, self.size if self.kind == "file" else -1, self.mtime_ns, self.ctime_ns, self.nlink)

    def __repr__(self) -> str:
        fields = (self.rel, self.kind, self.size, self.mtime_ns, oct(self.mode), self.link)
        return f"Entry{fields!r}"


class Plan:
    """Everything the patterns select, plus what went wrong while selecting it."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.dirs: set[str] = set()  # every source dir holding an entry ("" is the root)
        self.matched_dirs: set[str] = set()  # dirs a pattern named (emptied by a move)
        self.tree_dirs: set[str] = set()  # every dir inside a matched dir (rmdir'ed by a move)
        self.dir_ids: set[tuple[int, int]] = set()  # (st_dev, st_ino) of every source dir seen
        self.errors: list[str] = []
        self.unmatched: list[str] = []
        self.notes: list[str] = []


def split_pattern(pattern: str) -> list[str]:
    """Validate one pattern and return its path components; raise MoverUsageError if it escapes."""
    if not pattern or "\0" in pattern:
        raise MoverUsageError(f"invalid pattern {pattern!r}")
    if pattern.startswith("/"):
        raise MoverUsageError(f"pattern {pattern!r} is absolute; patterns are relative to --source")
    comps = [c for c in pattern.split("/") if c not in ("", ".")]
    if ".." in comps:
        raise MoverUsageError(f"pattern {pattern!r} leaves the source ('..' is refused)")
    if not comps:
        raise MoverUsageError(f"pattern {pattern!r} names the source itself; use '*' or '**'")
    return comps


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root + os.sep)


def _link_text_inside(dir_fd: int, name: str, parent_path: str, root: str) -> str | None:
    """Return the text to give a copy of symlink ``name`` in open directory ``dir_fd`` (the source
    directory at ``parent_path``), or None when it resolves outside ``root``.

    The text is kept as it is, as ``cp -a`` keeps it: rewriting an absolute link into a relative
    one re-pointed links whose path went through other symlinks (dangling after a move). The link
    is read through the descriptor its directory was listed with: no path to it is resolved again.
    """
    text = os.readlink(name, dir_fd=dir_fd)
    if not _inside(os.path.realpath(os.path.join(parent_path, text)), root):
        return None
    return text


class _Resolver:
    def __init__(self, root: str, root_fd: int, skip, cancelled: Callable[[], bool]):
        self.root = root
        self.root_fd = root_fd  # every directory is opened beneath it, no symlink followed
        self.skip = skip  # (st_dev, st_ino) of the target when it lies inside the source
        self.cancelled = cancelled
        self.plan = Plan()
        self.seen: set[str] = set()
        self.trees: set[str] = set()  # dirs already taken whole: '**' yields each of their subdirs too
        self.said: set[str] = set()  # notes already made
        self.listing_errors: set[str] = set()  # dirs whose listing failed ('**' may list one twice)

    def _open(self, rel: str) -> int:
        """Open source directory ``rel`` beneath the root (:func:`dirs.open_dir`: no symlink followed)."""
        return dirs.open_dir(self.root_fd, rel)

    def _cannot_list(self, rel: str, err: OSError) -> None:
        if rel not in self.listing_errors:
            self.listing_errors.add(rel)
            self.plan.errors.append(f"{rel or '.'}: cannot list: {err.strerror}")

    def _skipped_name(self, name: str, parent: str) -> bool:
        """Whether ``name`` (in source dir ``parent``) is one of the mover's own files: never taken,
        and said, so that a user's entry of that name is not left behind silently."""
        if name == JOURNAL_DIR:
            if self._only_mover_files(_join(parent, name)):
                return True  # the journal or record of a mover that wrote here: not worth a word
            what = "the mover's journal directory"
        elif TEMP_MARK in name and TEMP_RE.match(name) is not None:
            what = "a mover's temporary file"
        else:
            return False
        note = f"{_join(parent, name)}: not transferred: named like {what}"
        if note not in self.said:  # '**' may list a directory more than once
            self.said.add(note)
            self.plan.notes.append(note)
        return True

    def _only_mover_files(self, rel: str) -> bool:
        try:
            fd = self._open(rel)
        except OSError:
            return False
        try:
            names = os.listdir(fd)
        except OSError:
            return False
        finally:
            os.close(fd)
        return all(n in _MOVER_FILES or ".tmp-" in n for n in names)

    def _is_skipped_dir(self, st: os.stat_result) -> bool:
        return self.skip is not None and (st.st_dev, st.st_ino) == self.skip

    def match(self, pattern: str, comps: list[str]) -> bool:
        """Add to the plan what one pattern matches; return whether it matched anything."""
        found = False
        for rel, st in self._walk("", comps, literal=True, pattern=pattern):
            found = True
            self._take(rel, st, named=True)
        return found

    def _lstat(self, rel: str) -> os.stat_result | None:
        """lstat of ``rel`` through a descriptor of its directory; None if it is not there."""
        parent, _, name = rel.rpartition("/")
        try:
            fd = self._open(parent)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            self._cannot_list(parent, e)
            return None
        try:
            return os.lstat(name, dir_fd=fd)
        except (FileNotFoundError, NotADirectoryError):
            return None
        finally:
            os.close(fd)

    def _walk(self, rel: str, comps: list[str], literal: bool, pattern: str) -> Iterator:
        if not comps:
            st = os.fstat(self.root_fd) if not rel else self._lstat(rel)
            if st is not None:
                yield rel, st
            return
        head, rest = comps[0], comps[1:]
        if head == "**":
            yield from self._walk(rel, rest, False, pattern)
            for name, st in self._children(rel):
                if stat.S_ISDIR(st.st_mode):
                    yield from self._walk(_join(rel, name), comps, False, pattern)
            return
        if not _MAGIC.search(head):
            child = _join(rel, head)
            st = self._lstat(child)
            if st is None:
                return
            if self._skipped_name(head, rel) or (stat.S_ISDIR(st.st_mode) and self._is_skipped_dir(st)):
                return
            if stat.S_ISLNK(st.st_mode):
                if literal and not _inside(os.path.realpath(os.path.join(self.root, child)), self.root):
                    raise MoverUsageError(
                        f"pattern {pattern!r} leaves the source (symlink {child!r} points outside it)"
                    )
                if rest:
                    self.plan.notes.append(f"pattern {pattern!r}: symlink {child!r} is not followed")
                    return
            if not rest:
                yield child, st
            elif stat.S_ISDIR(st.st_mode):
                yield from self._walk(child, rest, literal, pattern)
            return
        rx = re.compile(fnmatch.translate(head))
        for name, st in self._children(rel):
            if rx.match(name):
                if not rest:
                    yield _join(rel, name), st
                elif stat.S_ISDIR(st.st_mode):
                    yield from self._walk(_join(rel, name), rest, False, pattern)

    def _children(self, rel: str) -> list[tuple[str, os.stat_result]]:
        """The entries of source directory ``rel``, sorted, each with its lstat (one fstatat on
        the directory's descriptor); the mover's own files and the target left out."""
        try:
            fd = self._open(rel)
        except OSError as e:
            self._cannot_list(rel, e)
            return []
        items = []
        try:
            with os.scandir(fd) as it:
                for de in it:
                    name = de.name
                    if name[0] == "." and self._skipped_name(name, rel):
                        continue
                    st = de.stat(follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode):
                        if self._is_skipped_dir(st):
                            continue
                        self.plan.dir_ids.add((st.st_dev, st.st_ino))
                    items.append((name, st))
        except OSError as e:
            self._cannot_list(rel, e)
            return []
        finally:
            os.close(fd)
        items.sort()
        return items

    def _take(self, rel: str, st: os.stat_result, named: bool) -> None:
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            self.plan.dir_ids.add((st.st_dev, st.st_ino))
            if named:
                self.plan.matched_dirs.add(rel)
            if not self._in_taken_tree(rel):
                self.trees.add(rel)
                self._take_tree(rel)
            return
        if rel in self.seen:
            return
        self.seen.add(rel)
        parent = rel.rpartition("/")[0]
        if stat.S_ISREG(mode):
            self._add(Entry(rel, "file", st.st_size, st.st_mtime_ns, stat.S_IMODE(mode), st=st), parent)
        elif stat.S_ISLNK(mode):
            text = self._link_text(rel)
            if text is None:
                self.plan.errors.append(f"{rel}: symlink points outside the source; refused")
            elif text is not False:
                self._add(Entry(rel, "link", 0, st.st_mtime_ns, link=text, st=st), parent)
        else:
            self.plan.errors.append(f"{rel}: not a regular file, directory or symlink; refused")

    def _link_text(self, rel: str):
        """The text of symlink ``rel`` if it resolves inside the source, None if not, False when it
        cannot be read (an error for it is in the plan)."""
        parent, _, name = rel.rpartition("/")
        try:
            fd = self._open(parent)
            try:
                return _link_text_inside(fd, name, _join_path(self.root, parent), self.root)
            finally:
                os.close(fd)
        except OSError as e:
            self.plan.errors.append(f"{rel}: cannot read the symlink: {e.strerror}")
            return False

    def _in_taken_tree(self, rel: str) -> bool:
        while True:
            if rel in self.trees:
                return True
            if not rel:
                return False
            rel = os.path.dirname(rel)

    def _add(self, entry: Entry, parent: str) -> None:
        self.plan.entries.append(entry)
        dirs_ = self.plan.dirs
        while parent not in dirs_:
            dirs_.add(parent)
            if not parent:
                break
            parent = parent.rpartition("/")[0]

    def _take_tree(self, top: str) -> None:
        stack = [top]
        seen, entries, dirs_ = self.seen, self.plan.entries, self.plan.dirs
        S_ISDIR, S_ISREG, S_IMODE = stat.S_ISDIR, stat.S_ISREG, stat.S_IMODE
        while stack:
            if self.cancelled():
                return
            rel = stack.pop()
            self.plan.tree_dirs.add(rel)
            subdirs = []
            prefix = f"{rel}/" if rel else ""
            for name, st in self._children(rel):
                child = prefix + name
                mode = st.st_mode
                if S_ISDIR(mode):
                    subdirs.append(child)
                elif S_ISREG(mode) and child not in seen:
                    # The common case inline (a regular file): what _take does for it.
                    seen.add(child)
                    entries.append(Entry(child, "file", st.st_size, st.st_mtime_ns, S_IMODE(mode), st=st))
                    if rel not in dirs_:
                        self._add_dir(rel)
                else:
                    self._take(child, st, named=False)
            stack.extend(reversed(subdirs))

    def _add_dir(self, rel: str) -> None:
        dirs_ = self.plan.dirs
        while rel not in dirs_:
            dirs_.add(rel)
            if not rel:
                break
            rel = rel.rpartition("/")[0]


def _join_path(root: str, rel: str) -> str:
    return os.path.join(root, rel) if rel else root


def _join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


def resolve(
    source: str,
    patterns: list[str],
    skip: tuple[int, int] | None = None,
    cancelled: Callable[[], bool] = lambda: False,
    source_fd: int | None = None,
) -> Plan:
    """Return the plan of what ``patterns`` select under the (real, absolute) ``source`` directory.

    Every directory is listed through a descriptor opened beneath ``source_fd`` (the source,
    opened once; opened here when not given) without following a symlink: a directory swapped for
    one while the plan is made is an error for it ("cannot list"), never listed through it.
    """
    split = [(p, split_pattern(p)) for p in patterns]  # validate all before touching the disk
    own_fd = source_fd is None
    if own_fd:
        source_fd = os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return _resolve(source, source_fd, split, skip, cancelled)
    finally:
        if own_fd:
            os.close(source_fd)


def _resolve(source: str, source_fd: int, split, skip, cancelled) -> Plan:
    resolver = _Resolver(source, source_fd, skip, cancelled)
    root = os.fstat(source_fd)
    resolver.plan.dir_ids.add((root.st_dev, root.st_ino))
    for pattern, comps in split:
        if not resolver.match(pattern, comps):
            resolver.plan.unmatched.append(pattern)
    return resolver.plan
