"""A source document and the languages midfill knows by file extension."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import PurePath

EXTENSIONS = {
    ".py": "python", ".pyi": "python", ".js": "javascript", ".mjs": "javascript", ".cjs": "javascript",
    ".jsx": "javascript", ".ts": "typescript", ".tsx": "typescript", ".java": "java", ".c": "c", ".h": "c",
    ".cc": "cpp", ".cpp": "cpp", ".cxx": "cpp", ".hpp": "cpp", ".hh": "cpp", ".cs": "csharp", ".go": "go",
    ".rs": "rust", ".rb": "ruby", ".php": "php", ".sh": "shell", ".bash": "shell", ".kt": "kotlin",
    ".swift": "swift", ".scala": "scala", ".lua": "lua", ".r": "r", ".jl": "julia", ".sql": "sql",
    ".html": "html", ".htm": "html", ".css": "css", ".scss": "css", ".json": "json", ".yaml": "yaml",
    ".yml": "yaml", ".toml": "toml", ".md": "markdown", ".markdown": "markdown", ".rst": "restructuredtext",
    ".txt": "text", ".proto": "protobuf", ".vue": "vue", ".dart": "dart", ".m": "objective-c",
    ".pl": "perl", ".hs": "haskell", ".ml": "ocaml", ".ex": "elixir", ".erl": "erlang", ".clj": "clojure",
}  # fmt: skip
FILENAMES = {"makefile": "makefile", "dockerfile": "dockerfile", "cmakelists.txt": "cmake"}
NATURAL_LANGUAGE = {"markdown", "restructuredtext", "text"}


def language_of(path: str) -> str | None:
    """The language of a file from its name, or None when midfill does not train on it."""
    name = PurePath(path).name.lower()
    if name in FILENAMES:
        return FILENAMES[name]
    return EXTENSIONS.get(PurePath(name).suffix)


@dataclass
class Document:
    text: str
    path: str
    lang: str | None = None
    license: str | list[str] | None = None  # from metadata (The Stack), when there is any
    source: str = ""
    unreadable: str | None = None  # why the file could not be read (permission denied, ...), if it could not

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "Document":
        return cls(**{k: raw.get(k) for k in ("text", "path", "lang", "license", "source", "unreadable") if k in raw})
