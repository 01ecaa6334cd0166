"""The sandboxed half of a Python task: load the candidate program, then answer calls of its entry point.

This file is copied into the sandbox and run there as a script, under whatever python3 the
sandbox user may run, so it imports nothing but the standard library. The trusted half
(judge.py) imports its codec and framing from here, so both sides speak one format.

Only plain data crosses the pipe: None, bool, int, float, complex, str, bytes and lists, tuples,
dicts, sets and frozensets of them, checked by exact type (a subclass, such as an int whose
__eq__ always says True, is refused). The candidate controls this whole process and may send
any bytes it likes; the judge decodes them into plain data or fails the run, so the most a
hostile program can do is return values.
"""

from __future__ import annotations

import json
import os
import select
import struct
import sys
import time

MAX_FRAME_BYTES = 16 * 2**20
MAX_DEPTH = 100
HEADER = struct.Struct("<Q")
TAGS = ("tuple", "dict", "set", "frozenset", "bytes", "complex")


class NotPlainData(Exception):
    """A value that may not cross between the candidate and the judge."""


def to_plain(value, depth: int = 0):
    """A JSON-ready form of `value`, refusing anything that is not plain data of exact built-in types."""
    if depth > MAX_DEPTH:
        raise NotPlainData("nested too deeply")
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return value
    if kind is list:
        return [to_plain(v, depth + 1) for v in value]
    if kind in (tuple, set, frozenset):
        return {kind.__name__: [to_plain(v, depth + 1) for v in value]}
    if kind is dict:
        return {"dict": [[to_plain(k, depth + 1), to_plain(v, depth + 1)] for k, v in value.items()]}
    if kind is bytes:
        return {"bytes": value.hex()}
    if kind is complex:
        return {"complex": [value.real, value.imag]}
    raise NotPlainData(f"a {kind.__name__} is not plain data")


def from_plain(data, depth: int = 0):
    """The value a `to_plain` form stands for; NotPlainData for anything else."""
    if depth > MAX_DEPTH:
        raise NotPlainData("nested too deeply")
    kind = type(data)
    if data is None or kind in (bool, int, float, str):
        return data
    if kind is list:
        return [from_plain(v, depth + 1) for v in data]
    if kind is not dict or len(data) != 1 or next(iter(data)) not in TAGS:
        raise NotPlainData("not a tagged value")
    tag, inner = next(iter(data.items()))
    try:
        if tag == "bytes":
            return bytes.fromhex(inner)
        if tag == "complex":
            real, imag = inner
            return complex(float(real), float(imag))
        items = [from_plain(v, depth + 1) for v in inner]
        if tag == "dict":
            return {k: v for k, v in items}
        return {"tuple": tuple, "set": set, "frozenset": frozenset}[tag](items)
    except (TypeError, ValueError) as exc:  # unhashable keys, malformed pairs
        raise NotPlainData(str(exc)) from None


def wait_for(fd: int, writable: bool, deadline: float | None) -> None:
    """Block until `fd` can be read (or written), or raise TimeoutError at `deadline` (monotonic)."""
    if deadline is None:
        return
    fds = ([], [fd]) if writable else ([fd], [])
    if not any(select.select(*fds, [], max(0.0, deadline - time.monotonic()))[:2]):
        raise TimeoutError("no answer in time")


def write_frame(fd: int, message, deadline: float | None = None) -> None:
    payload = json.dumps(message).encode("utf-8")
    data = HEADER.pack(len(payload)) + payload
    while data:
        wait_for(fd, True, deadline)
        try:
            data = data[os.write(fd, data) :]
        except BlockingIOError:
            continue


def read_exactly(fd: int, n: int, deadline: float | None) -> bytes:
    chunks = []
    while n:
        wait_for(fd, False, deadline)
        try:
            chunk = os.read(fd, min(n, 2**20))
        except BlockingIOError:
            continue
        if not chunk:
            raise EOFError("the other side closed the pipe")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int, deadline: float | None = None):
    """One message; with a deadline, TimeoutError if it has not fully arrived by then."""
    (size,) = HEADER.unpack(read_exactly(fd, HEADER.size, deadline))
    if size > MAX_FRAME_BYTES:
        raise NotPlainData(f"a message of {size} bytes is over the limit of {MAX_FRAME_BYTES}")
    try:
        return json.loads(read_exactly(fd, size, deadline))
    except (ValueError, RecursionError) as exc:
        raise NotPlainData(f"not JSON: {exc}") from None


def serve(program_path: str, entry_point: str, calls_fd: int, answers_fd: int) -> None:
    """Run the candidate program, then answer ["call", args, kwargs] with ["ok", value] or
    ["raised", type, message] until the judge closes the pipe."""
    namespace = {"__name__": "candidate", "__file__": program_path}
    try:
        with open(program_path, encoding="utf-8") as f:
            exec(compile(f.read(), program_path, "exec"), namespace)
        function = namespace[entry_point]
    except BaseException as exc:  # noqa: BLE001 - any failure to load is the candidate's
        write_frame(answers_fd, ["broken", f"{type(exc).__name__}: {exc}"[:500]])
        return
    write_frame(answers_fd, ["ready"])
    while True:
        try:
            _, args, kwargs = read_frame(calls_fd)
        except EOFError:
            return
        try:
            value = function(*from_plain(args), **from_plain(kwargs))
            answer = ["ok", to_plain(value)]
        except NotPlainData as exc:
            answer = ["unplain", str(exc)]
        except BaseException as exc:  # noqa: BLE001 - the candidate's exception is its answer
            answer = ["raised", type(exc).__name__, str(exc)[:500]]
        write_frame(answers_fd, answer)


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
