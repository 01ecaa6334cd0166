"""Instruction data in Refact's chat format, built offline from documented Python code.

Two kinds of pair per documented function: "write a function that <docstring summary>" answered
with the function, and "explain this code" (the function without its docstring) answered with
the summary. Quality filter: public functions of 3..40 lines whose docstring summary is 30..400
characters of plain English-looking text with at least six words.
"""

from __future__ import annotations

import ast
import re
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass

from midfill.prompts import ChatMessage, chat_prompt
from midfill.tokenizer import Tokenizer

SYSTEM = "You are a programming assistant"
MIN_SUMMARY, MAX_SUMMARY = 30, 400
MIN_LINES, MAX_LINES = 3, 40
PLAIN_TEXT = re.compile(r"^[A-Za-z][\x20-\x7e]*$")


@dataclass(frozen=True)
class InstructionPair:
    query: str
    answer: str
    kind: str  # "write" or "explain"


def summary_of(docstring: str) -> str | None:
    summary = " ".join(docstring.strip().split("\n\n")[0].split())
    if not MIN_SUMMARY <= len(summary) <= MAX_SUMMARY or len(summary.split()) < 6:
        return None
    if not PLAIN_TEXT.match(summary) or summary.lower().startswith(("deprecated", "internal", "todo", "xxx")):
        return None
    return summary


def without_docstring(source: str, node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    doc = node.body[0]
    lines = source.splitlines()
    first, last = doc.lineno - node.lineno, doc.end_lineno - node.lineno
    return "\n".join(lines[:first] + lines[last + 1 :])


def source_lines(text: str) -> list[str]:
    """The lines as ast numbers them (split at \\r\\n, \\r and \\n only), ends kept."""
    return re.findall(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$", text)


def source_segment(lines: list[str], node: ast.AST) -> str | None:
    """What ast.get_source_segment(text, node, padded=True) gives, from lines split once: calling it
    per function re-splits the whole file each time, which is quadratic in a large test module."""
    first, last = node.lineno - 1, node.end_lineno - 1
    if last >= len(lines):
        return None
    body = [line.encode() for line in lines[first : last + 1]]
    body[-1] = body[-1][: node.end_col_offset]
    if first == last:
        return body[0][node.col_offset :].decode(errors="replace")
    indent = body[0][: node.col_offset].decode(errors="replace")
    body[0] = "".join(c if c in "\f\t" else " " for c in indent).encode() + body[0][node.col_offset :]
    return b"".join(body).decode(errors="replace")


def instruction_pairs(text: str) -> Iterator[InstructionPair]:
    """Pairs from the documented public functions and methods of one Python file."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return
    lines = source_lines(text)
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or node.name.startswith("_"):
            continue
        docstring = ast.get_docstring(node)
        summary = summary_of(docstring) if docstring else None
        if summary is None:
            continue
        segment = source_segment(lines, node)
        if segment is None or not MIN_LINES <= segment.count("\n") + 1 <= MAX_LINES:
            continue
        source = textwrap.dedent(segment)
        bare = without_docstring(source, node)
        if len(bare.splitlines()) < 2:
            continue
        signature = f"{node.name}({ast.unparse(node.args)})"
        yield InstructionPair(f"Write a Python function `{signature}`: {summary}", f"```python\n{source}\n```", "write")
        yield InstructionPair(f"Explain what this Python code does:\n```python\n{bare}\n```", summary, "explain")


def pair_tokens(tok: Tokenizer, pair: InstructionPair) -> tuple[list[int], list[bool]]:
    """The chat prompt, then " {answer}" and <|endoftext|>; only the answer is a target."""
    prompt = chat_prompt(tok, [ChatMessage("system", SYSTEM), ChatMessage("user", pair.query)])
    answer = tok.encode(" " + pair.answer) + [tok.eot_id]
    return prompt + answer, [False] * len(prompt) + [True] * len(answer)
