"""Where a completion ends: stop strings and the FIM line rules an editor expects.

- single-line: the completion ends at its first newline;
- multi-line: it ends before a blank line, or before a line indented less than the cursor's line
  (the code after that belongs to an enclosing block, which the suffix already has);
- line modes trim trailing whitespace, and an empty completion is a valid answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from midfill.errors import MidfillError

LineMode = Literal["free", "single-line", "multi-line"]
LINE_MODES = ("free", "single-line", "multi-line")


def indent_of(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def cursor_indent(prefix: str) -> int:
    """Indentation of the line the cursor is on (the text after the prefix's last newline)."""
    return indent_of(prefix.rsplit("\n", 1)[-1])


@dataclass(frozen=True)
class StopRules:
    stop_strings: tuple[str, ...] = ()
    mode: LineMode = "free"
    cursor_indent: int = 0
    trim_trailing_whitespace: bool = False

    def __post_init__(self) -> None:
        if self.mode not in LINE_MODES:
            raise MidfillError(f"unknown completion mode {self.mode!r}; use one of {', '.join(LINE_MODES)}")
        if any(s == "" for s in self.stop_strings):
            raise MidfillError("stop strings must not be empty")

    @property
    def trims(self) -> bool:
        return self.trim_trailing_whitespace or self.mode != "free"

    def find_end(self, text: str) -> int | None:
        """Index where the completion ends, if a stop condition has appeared in `text`."""
        ends = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
        if self.mode == "single-line" and "\n" in text:
            ends.append(text.index("\n"))
        elif self.mode == "multi-line":
            end = self._multi_line_end(text)
            if end is not None:
                ends.append(end)
        return min(ends) if ends else None

    def _multi_line_end(self, text: str) -> int | None:
        lines = text.split("\n")
        newline_at = len(lines[0])
        for i, line in enumerate(lines[1:], start=1):
            content = line.lstrip(" \t")
            complete = i < len(lines) - 1
            if (complete and not content) or (content and indent_of(line) < self.cursor_indent):
                return newline_at
            newline_at += 1 + len(line)
        return None

    def safe_length(self, text: str) -> int:
        """How much of `text` (not yet stopped) is final, whatever tokens come next.

        Held back: trailing whitespace in line modes (a dedent or blank line may still end the
        completion there) and any tail that could be the start of a stop string.
        """
        safe = len(text.rstrip()) if self.trims else len(text)
        for stop in self.stop_strings:
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    safe = min(safe, len(text) - k)
                    break
        return safe

    def finalize(self, text: str) -> str:
        return text.rstrip() if self.trims else text
