"""Where a completion ends: stop strings and the FIM line rules an editor expects.

- single-line: the completion ends at its first newline;
- multi-line: it ends before a blank line, or before a line indented less than the cursor's line
  (the code after that belongs to an enclosing block, which the suffix already has);
- line modes trim trailing whitespace, and an empty completion is a valid answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from midfill.errors import MidfillError
from midfill.prompts import indent_of

LINE_MODES = ("free", "single-line", "multi-line")
MAX_STOP_STRINGS = 32  # OpenAI's own limit is 4; each string is searched for after every token
MAX_STOP_CHARS = 256
CLOSERS = set(")]}>\"'`;,:.")  # a completion ending in one the suffix starts with has written it twice


def suffix_window(suffix: str) -> str:
    """The part of the suffix a completion's end is compared with: its first two lines, at most 256 characters."""
    return "\n".join(suffix.split("\n", 2)[:2])[:MAX_STOP_CHARS]


@dataclass(frozen=True)
class StopRules:
    stop_strings: tuple[str, ...] = ()
    single_line: bool = False  # end at the first newline
    stop_at_blank_line: bool = False  # end before a blank line
    min_indent: int | None = None  # end before a non-blank line indented less than this
    trim_trailing_whitespace: bool = False
    suffix_start: str = ""  # the text after the cursor (its first line or two): an answer's end that repeats it is cut

    def __post_init__(self) -> None:
        if len(self.stop_strings) > MAX_STOP_STRINGS:
            raise MidfillError(f"{len(self.stop_strings)} stop strings given; at most {MAX_STOP_STRINGS} are allowed")
        if any(s == "" for s in self.stop_strings):
            raise MidfillError("stop strings must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in self.stop_strings):
            raise MidfillError(f"a stop string is longer than {MAX_STOP_CHARS} characters")

    @classmethod
    def for_mode(cls, mode: str, cursor_indent: int = 0, stop_strings: tuple[str, ...] = (), suffix_start: str = "") -> "StopRules":
        """The rules of a completion mode: free, single-line or multi-line."""
        if mode == "free":
            return cls(stop_strings, suffix_start=suffix_start)
        if mode == "single-line":
            return cls(stop_strings, single_line=True, trim_trailing_whitespace=True, suffix_start=suffix_start)
        if mode == "multi-line":
            return cls(stop_strings, stop_at_blank_line=True, min_indent=cursor_indent, trim_trailing_whitespace=True,
                       suffix_start=suffix_start)
        raise MidfillError(f"unknown completion mode {mode!r}; use one of {', '.join(LINE_MODES)}")

    @property
    def trims(self) -> bool:
        line_rules = self.single_line or self.stop_at_blank_line or self.min_indent is not None
        return self.trim_trailing_whitespace or line_rules

    def find_end(self, text: str) -> int | None:
        """Index where the completion ends, if a stop condition has appeared in `text`."""
        ends = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
        if self.single_line and "\n" in text:
            ends.append(text.index("\n"))
        if self.stop_at_blank_line or self.min_indent is not None:
            end = self._line_end(text)
            if end is not None:
                ends.append(end)
        return min(ends) if ends else None

    def _line_end(self, text: str) -> int | None:
        lines = text.split("\n")
        newline_at = len(lines[0])
        for i, line in enumerate(lines[1:], start=1):
            content = line.lstrip(" \t")
            complete = i < len(lines) - 1
            if self.stop_at_blank_line and complete and not content:
                return newline_at
            if self.min_indent is not None and content and indent_of(line) < self.min_indent:
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
        for k in range(min(len(self.suffix_start), len(text)), 0, -1):
            if text.endswith(self.suffix_start[:k]):  # may turn out to repeat the suffix: wait for the end
                safe = min(safe, len(text) - k)
                break
        return safe

    def finalize(self, text: str) -> str:
        text = text[: len(text) - self.suffix_overlap(text)]
        return text.rstrip() if self.trims else text

    def suffix_overlap(self, text: str) -> int:
        """How many characters at the end of `text` repeat the start of the suffix, so that the
        editor would show them twice: the rest of the cursor's line (or whole lines), or closing
        brackets, quotes and punctuation. A shared letter or a word fragment is not cut."""
        suffix = self.suffix_start
        for k in range(min(len(suffix), len(text)), 0, -1):
            overlap = suffix[:k]
            if not text.endswith(overlap) or not overlap.strip():
                continue
            at_line_end = k == len(suffix) or suffix[k] == "\n"
            if at_line_end or all(ch in CLOSERS or ch in " \t" for ch in overlap):
                return k
        return 0
