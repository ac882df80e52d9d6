"""Read a WDF into plain data while remembering the line and column of every node.

The YAML is composed with a safe loader only (libyaml's when available, for speed); the node tree
is then turned into dicts, lists and scalars here, recording each node's mark under its key path,
so that every later problem can name its line and column.
"""

from __future__ import annotations

import re
from pathlib import Path as FsPath
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from ..errors import WDFError
from .problems import Mark, Path, Problems

_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# libyaml reports a reader error's position in bytes of the UTF-8 text, PyYAML in characters.
_POSITION_IN_BYTES = _BaseLoader is not yaml.SafeLoader

_STR = "tag:yaml.org,2002:str"
_MAP = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"
_MERGE = "tag:yaml.org,2002:merge"

# A WDF is a few levels deep; anything deeper is an attack or an accident, not a workflow.
MAX_DEPTH = 32
# Aliases can make a small file expand into an enormous tree ("billion laughs"): stop early.
MAX_NODES = 250_000


class MarkedLoader(_BaseLoader):
    """A safe YAML loader whose documents are read with :func:`compose_marked` (never unsafe tags)."""


class _TooLarge(Exception):
    """The aliases of the document expand to more than MAX_NODES nodes."""


def read_text(path: FsPath, problems: Problems) -> str:
    """The file's text, or WDFError if it cannot be read or is not UTF-8 text."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise WDFError(
            f"{problems.file}: cannot read the workflow description: {exc.strerror or exc}"
        ) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        problems.add_at(line, column, f"the file is not UTF-8 text (byte 0x{data[exc.start]:02x})")
        problems.fail()


def _position(text: str, index: int) -> tuple[int, int]:
    """1-based line and column of character ``index`` in ``text``."""
    index = max(0, min(index, len(text)))
    return text.count("\n", 0, index) + 1, index - (text.rfind("\n", 0, index) + 1) + 1


_BLOCK_END_AFTER_ITEM = ("expected <block end>, but found '?'", "did not find expected '-' indicator")


def _indentation_hint(exc: yaml.MarkedYAMLError, text: str) -> str | None:
    """Say which key is mis-indented when a key sits at the level of the list items above it."""
    mark = exc.problem_mark
    if mark is None or "block collection" not in (exc.context or ""):
        return None
    if not any(p in (exc.problem or "") for p in _BLOCK_END_AFTER_ITEM):
        return None
    lines = text.splitlines()
    if mark.line >= len(lines):
        return None
    key = re.match(r"\s*([^:#]+?)\s*:", lines[mark.line])
    shown = f"`{key.group(1)}:`" if key else "this line"
    return (
        f"{shown} is probably indented one level too little: it belongs to the list entry above it, "
        "so indent it like that entry's keys (after the `- `)"
    )


def _yaml_problem(exc: yaml.YAMLError, text: str, problems: Problems) -> None:
    """Turn a YAML syntax error into a problem at its line and column."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = (mark.line + 1, mark.column + 1) if mark is not None else (None, None)
        message = (
            f"YAML syntax error {exc.context}: {exc.problem}"
            if exc.context
            else f"YAML syntax error: {exc.problem}"
        )
        hint = _indentation_hint(exc, text)
        problems.add_at(*where, message + (f"; {hint}" if hint else ""))
        return
    if isinstance(exc, yaml.reader.ReaderError):
        index = exc.position
        if _POSITION_IN_BYTES:
            index = len(text.encode("utf-8")[:index].decode("utf-8", errors="ignore"))
        problems.add_at(*_position(text, index), f"YAML cannot read the file: {exc.reason}")
        return
    problems.add_at(1, 1, f"YAML error: {exc}")


def compose_marked(text: str, problems: Problems) -> Any:
    """Parse ``text`` into plain data, recording marks in ``problems``; WDFError if it is not YAML."""
    loader = MarkedLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except yaml.YAMLError as exc:
            _yaml_problem(exc, text, problems)
            problems.fail()
        except RecursionError:
            problems.add_at(1, 1, "the document is nested too deeply to be a workflow description")
            problems.fail()
        if node is None:
            problems.add_at(
                1, 1, "the file is empty", "a mapping with the keys workflow, services, datamovers, steps"
            )
            problems.fail()
        builder = _Builder(loader, problems)
        try:
            data = builder.build(node, (), 0)
        except _TooLarge:
            problems.add_at(1, 1, f"the document expands to more than {MAX_NODES} values (through aliases)")
            problems.fail()
    finally:
        loader.dispose()
    return data


class _Builder:
    """Turn a composed node tree into plain data and marks."""

    def __init__(self, loader: MarkedLoader, problems: Problems):
        self.loader = loader
        self.problems = problems
        self.count = 0
        self.open: set[int] = set()  # ids of the collections being built: a repeat is a cycle

    def build(self, node: Node, path: Path, depth: int) -> Any:
        """The plain value of ``node``, found at ``path``."""
        self.count += 1
        if self.count > MAX_NODES:
            raise _TooLarge
        start = node.start_mark
        if isinstance(node, ScalarNode):
            self.problems.marks[path] = Mark(start.line + 1, start.column + 1, node.value)
            return node.value if node.tag == _STR else self._scalar(node, path)
        self.problems.marks[path] = Mark(start.line + 1, start.column + 1, None)
        if depth >= MAX_DEPTH:
            self.problems.add(path, f"nested more than {MAX_DEPTH} levels deep")
            return None
        if id(node) in self.open:
            self.problems.add(path, "an alias refers to a collection that contains it (a cycle)")
            return None
        self.open.add(id(node))
        try:
            if isinstance(node, SequenceNode):
                self._check_tag(node, _SEQ, path)
                return [self.build(child, (*path, i), depth + 1) for i, child in enumerate(node.value)]
            if isinstance(node, MappingNode):
                self._check_tag(node, _MAP, path)
                return self._mapping(node, path, depth)
        finally:
            self.open.discard(id(node))
        return None

    def _check_tag(self, node: Node, standard: str, path: Path) -> None:
        if node.tag != standard:
            self.problems.add(
                path, f"unsupported YAML tag {node.tag!r}", "plain YAML mappings, lists and scalars"
            )
            self.problems.tainted.add(path)

    def _scalar(self, node: ScalarNode, path: Path) -> Any:
        try:
            return self.loader.construct_object(node)
        # Only safe constructors exist: an unknown or python/* tag fails here, and so does an
        # implicitly-typed value that the type's constructor rejects (e.g. 2023-13-45).
        except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
            reason = getattr(exc, "problem", None) or str(exc)
            self.problems.add(path, f"cannot read this value: {reason}", "plain YAML scalars")
            self.problems.tainted.add(path)
            return None

    def _mapping(self, node: MappingNode, path: Path, depth: int) -> dict[str, Any]:
        seen: dict[str, Mark] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, ScalarNode) and key_node.tag != _MERGE:
                key = key_node.value
                mark = Mark(key_node.start_mark.line + 1, key_node.start_mark.column + 1, key)
                if key in seen:
                    self.problems.key_marks[(*path, key)] = mark
                    self.problems.add(
                        (*path, key), f"duplicate key {key!r} (first at line {seen[key].line})", key=True
                    )
                else:
                    seen[key] = mark
        try:
            # Merge keys (<<: *anchor) are resolved the standard way; explicit keys win.
            self.loader.flatten_mapping(node)
        except yaml.YAMLError as exc:
            self.problems.add(
                path,
                f"invalid merge key: {getattr(exc, 'problem', None) or exc}",
                "<<: an alias of a mapping or a list of them",
            )
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                mark = key_node.start_mark
                self.problems.add_at(
                    mark.line + 1, mark.column + 1, "a key must be plain text, not a list or mapping"
                )
                continue
            key = key_node.value
            sub = (*path, key)
            self.problems.key_marks[sub] = Mark(
                key_node.start_mark.line + 1, key_node.start_mark.column + 1, key
            )
            out[key] = self.build(value_node, sub, depth + 1)
        return out
