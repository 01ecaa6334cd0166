"""The real llama.vim plugin (../shared/clients/llama.vim, unmodified) in Vim inside tmux, against `midfill serve`.

The vimrc is the README's llama.vim set-up and nothing else: where midfill refuses what the plugin
sends, these tests see what a user sees (no ghost text; an instruction that deletes the selection).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from midfill.hub import EMBEDDED_MODEL
from tests.conftest import find_golden
from tests.helpers import serve_subprocess

LLAMA_VIM = find_golden().parent / "clients" / "llama.vim"


def missing_tools() -> list[str]:
    """What the test needs and this machine lacks: llama.vim shows its ghost text with Vim's text properties."""
    missing = [tool for tool in ("vim", "tmux", "curl") if shutil.which(tool) is None]
    if "vim" not in missing and "+textprop" not in subprocess.run(["vim", "--version"], capture_output=True, text=True).stdout:
        missing.append("vim with +textprop (not vim-tiny)")
    return missing


MISSING_TOOLS = missing_tools()

pytestmark = [
    pytest.mark.skipif(bool(MISSING_TOOLS), reason=f"{', '.join(MISSING_TOOLS)} not installed (.ci/run installs them)"),
    pytest.mark.skipif(not (LLAMA_VIM / "autoload" / "llama.vim").is_file(),
                       reason=f"llama.vim not found at {LLAMA_VIM} (the ../shared checkout is absent)"),
    pytest.mark.skipif(not (EMBEDDED_MODEL / "model.safetensors").is_file(), reason="no embedded model in this checkout"),
]

WAIT_S = 60  # for one model answer to show up in the editor
HINT_TEXT = re.compile(re.escape("\x1b[38;5;202m") + r"([^\x1b]*)")  # llama_hl_fim_hint (ctermfg=202): the ghost text
ESCAPES = re.compile(r"\x1b\[[0-9;]*m")


def vimrc(base: str) -> str:
    """The README's llama.vim set-up for a server at base, with the plugin on the runtimepath."""
    return (
        "set nocompatible\n"
        f"set runtimepath^={LLAMA_VIM}\n"
        "let g:llama_config = {\n"
        f"    \\ 'endpoint_fim':  '{base}/infill',\n"
        f"    \\ 'endpoint_inst': '{base}/v1/chat/completions',\n"
        "    \\ }\n"
    )


@dataclass
class Served:
    base: str
    log: Path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """A `midfill serve` process on the embedded model: its base URL and its log file."""
    with serve_subprocess(tmp_path_factory.mktemp("serve")) as (base, _, log):
        yield Served(base, log)


class Vim:
    """Vim in a detached tmux session of fixed size, with a clean HOME and no swap file, driven by keys."""

    def __init__(self, folder: Path, server: Served, file: Path) -> None:
        self.server = server
        self.socket = f"midfill-llama-vim-{uuid.uuid4().hex[:12]}"
        self.env = {k: v for k, v in os.environ.items() if k != "TMUX"}
        (folder / "home").mkdir(exist_ok=True)
        (folder / "vimrc").write_text(vimrc(server.base))
        vim = ["env", f"HOME={folder / 'home'}", "TERM=screen-256color", "vim", "-n", "-Nu", str(folder / "vimrc"), str(file)]
        self.tmux("new-session", "-d", "-s", "vim", "-x", "160", "-y", "40", *vim, check=True)

    def tmux(self, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", *args],
                              capture_output=True, text=True, env=self.env, check=check)

    def keys(self, *keys: str) -> None:
        """tmux key names: Enter, Escape, Tab ..."""
        self.tmux("send-keys", "-t", "vim", *keys)

    def type(self, text: str) -> None:
        """Literal text; each newline is an Enter."""
        for i, line in enumerate(text.split("\n")):
            if i:
                self.keys("Enter")
            if line:
                self.tmux("send-keys", "-t", "vim", "-l", line)

    def screen(self, colours: bool = False) -> str:
        return self.tmux("capture-pane", "-p", *(["-e"] if colours else []), "-t", "vim").stdout

    def wait(self, what: str, done: Callable[[], object], timeout: float = WAIT_S) -> object:
        """done()'s first truthy value, polled; on timeout the test fails showing the screen and the server's log."""
        deadline = time.monotonic() + timeout
        while not (value := done()):
            if time.monotonic() > deadline:
                screen = "\n".join(line for line in self.screen().splitlines() if line != "~")
                log = "\n".join(self.server.log.read_text().splitlines()[-20:])
                pytest.fail(f"no {what} within {timeout:.0f} s; the screen:\n{screen}\nthe server's log:\n{log}")
            time.sleep(0.1)
        return value

    def wait_ready(self) -> None:
        """Vim showing the buffer (Vim 9.0 stops at llama.vim's start-up warning until Enter is pressed)."""
        def ready() -> bool:
            screen = self.screen()
            if "Press ENTER" in screen:
                self.keys("Enter")
                return False
            return "~" in screen.splitlines()
        self.wait("Vim screen", ready, timeout=15)

    def settled(self, what: str, until: Callable[[str], bool], quiet_s: float = 3.0) -> str:
        """The screen, once until(screen) holds and the screen has not changed for quiet_s."""
        last = {"screen": "", "since": time.monotonic()}
        def quiet() -> str:
            screen, now = self.screen(), time.monotonic()
            if screen != last["screen"]:
                last.update(screen=screen, since=now)
            return screen if until(screen) and now - last["since"] >= quiet_s else ""
        return self.wait(what, quiet)

    def quit_saving(self) -> None:
        self.keys("Escape")
        self.type(":wq\n")
        self.wait("exit of Vim", lambda: self.tmux("has-session", "-t", "vim").returncode != 0, timeout=10)

    def close(self) -> None:
        self.tmux("kill-server")


@pytest.fixture
def editor(tmp_path: Path, server: Served):
    """Opens Vim on a file; its tmux session is killed afterwards, whatever happened."""
    opened: list[Vim] = []

    def open_file(file: Path) -> Vim:
        opened.append(Vim(tmp_path, server, file))
        opened[-1].wait_ready()
        return opened[-1]

    yield open_file
    for vim in opened:
        vim.close()


def ghost_text(vim: Vim, line: str) -> str:
    """The first non-blank line of the suggestion shown, once the screen shows line (the last one typed); else ''."""
    screen = vim.screen(colours=True)
    if not any(ESCAPES.sub("", row).startswith(line) for row in screen.splitlines()):
        return ""  # Vim has not taken all the keys yet: a suggestion now would be for an earlier position
    return next((hint for hint in HINT_TEXT.findall(screen) if hint.strip()), "")


def test_tab_accepts_the_ghost_text_and_it_is_saved(editor, tmp_path):
    file = tmp_path / "fib.py"
    typed = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fib"
    vim = editor(file)
    vim.keys("i")
    vim.type(typed)
    shown = vim.wait("ghost text", lambda: ghost_text(vim, typed.split("\n")[-1]))
    vim.keys("Tab")  # keymap_fim_accept_full
    vim.quit_saving()

    written = file.read_text()
    assert written.startswith(typed), written
    completion = written[len(typed):]
    assert completion.strip(), f"nothing was inserted: {written!r}"
    assert shown.split()[0] in completion, (shown, completion)


def test_instruction_replaces_the_selection_with_the_answer(editor, tmp_path):
    file = tmp_path / "area.py"
    before, selected, after = ["import math", ""], ["def area(r):", "    return 3.14 * r * r"], ["", "print(area(2))"]
    file.write_text("\n".join(before + selected + after) + "\n")
    first = len(before) + 1
    vim = editor(file)
    for _ in range(3):
        vim.type(f"{first}GVj\\lli")  # keymap_inst_trigger (<leader>lli) on a visual selection asks for the instruction
        vim.wait("instruction prompt", lambda: "Instruction:" in vim.screen())
        vim.type("use math.pi\n")
        screen = vim.settled("finished answer", lambda screen: "Processing..." not in screen)
        assert "Instruct job failed" not in screen, screen
        if "Ready!" in screen:
            break
        # Vim may hand llama.vim the last lines of a long answer after curl has exited, which takes the request
        # from "Ready" back to "Generating" for good (a race in the plugin): cancel (keymap_inst_cancel), ask again.
        vim.type(f"{first}G")
        vim.keys("Escape")
    else:
        pytest.fail(f"the answer never stayed ready:\n{screen}")
    vim.type(f"{first}G")
    vim.keys("Tab")  # keymap_inst_accept, on the selection in normal mode: replaces it with the answer
    vim.quit_saving()

    lines = file.read_text().split("\n")[:-1]
    assert lines[:len(before)] == before and lines[len(lines) - len(after):] == after, lines
    answer = lines[len(before):len(lines) - len(after)]
    assert "\n".join(answer).strip(), f"the selection was replaced by nothing: {lines}"
    assert answer != selected, lines
