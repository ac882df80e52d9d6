"""``{{ NAME }}`` variables in WDF values: checked with Jinja's lexer, substituted by hand.

A WDF must never run code nor reach Python attributes, so nothing here renders a template: Jinja's
lexer only tells a plain ``{{ NAME }}`` reference apart from every other construct (attribute
access, filters, calls, statements, comments), and plain references are replaced with a regular
expression.
"""

from __future__ import annotations

import re
from typing import Any

import jinja2

from .problems import Path, Problems

# Only lexing: this environment never compiles nor renders anything.
_LEXER_ENV = jinja2.Environment(autoescape=False)
_OPENERS = ("{{", "{%", "{#")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_REFERENCE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_STATEMENT_TOKENS = {"block_begin", "raw_begin", "linestatement_begin"}
_COMMENT_TOKENS = {"comment_begin", "linecomment_begin"}
_ONLY_PLAIN = "only plain {{ NAME }} references"
# Built in inside a step only: the step's name (as IO-SEA WM predefines it).
STEP_VARIABLE = "STEP"


def template_opener(text: str) -> str | None:
    """The first of ``{{``, ``{%``, ``{#`` that ``text`` contains, or None: text from the command
    line is a value, and a value is never a template."""
    return next((o for o in _OPENERS if o in text), None)


def _expression_kind(tokens: list[tuple[str, str]]) -> str:
    """Name what a non-plain ``{{ ... }}`` expression does, for the message."""
    values = {value for kind, value in tokens if kind == "operator"}
    if "|" in values:
        return "a filter"
    if "." in values or "[" in values:
        return "attribute or item access"
    if "(" in values:
        return "a call"
    if not tokens:
        return "an empty expression"
    if len(tokens) == 1 and tokens[0][0] == "name":
        return f"the non-ASCII name {tokens[0][1]!r}"
    return "an expression"


def template_problem(text: str) -> str | None:
    """Why ``text`` is not plain text with plain ``{{ NAME }}`` references, or None if it is."""
    try:
        tokens = list(_LEXER_ENV.lex(text))
    except jinja2.TemplateSyntaxError as exc:
        return f"invalid template syntax: {exc.message}"
    inside: list[tuple[str, str]] | None = None
    for _, kind, value in tokens:
        if kind in _STATEMENT_TOKENS:
            return f"a {{% ... %}} statement is not allowed ({_ONLY_PLAIN} are)"
        if kind in _COMMENT_TOKENS:
            return f"a {{# ... #}} comment is not allowed ({_ONLY_PLAIN} are)"
        if kind == "variable_begin":
            if value != "{{":
                return f"whitespace control {value!r} is not allowed ({_ONLY_PLAIN} are)"
            inside = []
        elif kind == "variable_end":
            if value != "}}":
                return f"whitespace control {value!r} is not allowed ({_ONLY_PLAIN} are)"
            if (
                inside is None
                or len(inside) != 1
                or inside[0][0] != "name"
                or not _IDENTIFIER.match(inside[0][1])
            ):
                return f"{_expression_kind(inside or [])} is not allowed in {{{{ }}}} ({_ONLY_PLAIN} are)"
            inside = None
        elif inside is not None and kind != "whitespace":
            inside.append((kind, value))
    if inside is not None:
        return "a {{ is not closed by }}"
    return None


def substitute(data: Any, variables: dict[str, str], problems: Problems, path: Path = ()) -> Any:
    """``data`` with every ``{{ NAME }}`` in its string values replaced; problems for the rest."""
    if isinstance(data, str):
        return _substitute_text(data, variables, problems, path) if any(o in data for o in _OPENERS) else data
    if isinstance(data, dict):
        return {k: substitute(v, variables, problems, (*path, k)) for k, v in data.items()}
    if isinstance(data, list):
        return [substitute(v, variables, problems, (*path, i)) for i, v in enumerate(data)]
    return data


def _substitute_text(text: str, variables: dict[str, str], problems: Problems, path: Path) -> str:
    why = template_problem(text)
    if why is not None:
        problems.add(
            path,
            why,
            "text with plain {{ NAME }} references only",
        )
        problems.tainted.add(path)
        return text
    missing = [name for name in dict.fromkeys(_REFERENCE.findall(text)) if name not in variables]
    for name in missing:
        known = ", ".join(sorted(variables)) or "none"
        if name == STEP_VARIABLE:
            hint = "{{ STEP }} only in a step's values, where it is the step's name"
        else:
            hint = f"{name}=value on the command line; defined: {known}"
        problems.add(path, f"undefined variable {name!r}", hint)
    if missing:
        problems.tainted.add(path)
        return text
    # The replacement is inserted as is: a value containing {{ }} is never expanded again.
    return _REFERENCE.sub(lambda m: str(variables[m.group(1)]), text)
