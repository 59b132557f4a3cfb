"""Readers of user-given files (safedig_kernels._io, workflow.prompts) fail closed.

- JSON nested too deeply, or holding an integer longer than Python converts, is the reader's
  ValueError naming the file (json.loads would raise RecursionError or a bare ValueError);
- a FIFO, a device, a directory or a socket where a file is expected is refused before it is
  opened (reading a FIFO blocks forever), with an error naming the path and its kind;
- a prompt file or steering config that is not UTF-8 names its file.

The special-file helpers (`specials`, `SpecialFiles`) are shared with tests/checkpoints/. A
reader that regresses into opening a FIFO fails its test after a timeout instead of hanging the
suite: the call runs in a thread, and a blocked one is released by opening the FIFO's write end.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch
from safetensors.torch import save_file

from safedig_kernels._io import (
    MAX_JSON_DEPTH,
    atomic_write,
    json_too_deep,
    loads_json,
    read_json,
    regular_file,
)
from safedig_kernels.integrations.diffusers.config import SafeDIGConfig
from safedig_kernels.workflow.prompts import load_prompts

posix_only = pytest.mark.skipif(os.name != "posix" or not hasattr(os, "mkfifo"), reason="needs FIFOs and /dev/null")

# (id, what the error says the path is)
SPECIAL_KINDS = [pytest.param("fifo", "FIFO", id="fifo"), pytest.param("directory", "directory", id="directory"),
                 pytest.param("devnull", "character device", id="dev-null"),
                 pytest.param("socket", "socket", id="socket")]

DEEP = "[" * 100_000                                   # json.loads: RecursionError
DEEPISH = "[" * 500 + "]" * 500                        # parses, but breaks copies and reprs later
LONG_INT = "1" * 5000                                  # json.loads: ValueError (int digit limit, 3.11+)
needs_digit_limit = pytest.mark.skipif(not getattr(sys, "get_int_max_str_digits", lambda: 0)(),
                                       reason="no int digit limit before Python 3.11")


# -- special files, shared with tests/checkpoints/test_checkpoint_files.py ---------------------------
class SpecialFiles:
    """Makes FIFOs, sockets, directories and /dev/null links where a file is expected, and calls
    readers on them without ever hanging the test run."""

    TIMEOUT_S = 20.0

    def __init__(self) -> None:
        self.fifos: list[Path] = []
        self._sockets: list[socket.socket] = []
        self._dirs: list[str] = []

    def make(self, kind: str, path: Path) -> Path:
        """`path` (its parent must exist) becomes a `kind` ("fifo", "directory", "devnull",
        "socket"); an existing file there is replaced."""
        if path.is_file() or path.is_symlink():
            path.unlink()
        if kind == "fifo":
            os.mkfifo(path)
            self.fifos.append(path)
        elif kind == "directory":
            path.mkdir()
        elif kind == "devnull":
            path.symlink_to(os.devnull)
        elif kind == "socket":
            # AF_UNIX paths are limited to ~107 bytes: bind in a short folder, link to it.
            short = tempfile.mkdtemp(prefix="sk")
            self._dirs.append(short)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sockets.append(sock)
            sock.bind(os.path.join(short, "s"))
            path.symlink_to(os.path.join(short, "s"))
        else:
            raise ValueError(f"unknown kind {kind!r}")
        return path

    def call(self, fn: Callable, *args: Any, **kwargs: Any) -> Optional[BaseException]:
        """fn(*args, **kwargs) in a thread; returns what it raised (None if it returned). Fails
        the test when it has not returned within TIMEOUT_S, after releasing it."""
        outcome: list[Optional[BaseException]] = []

        def run() -> None:
            try:
                fn(*args, **kwargs)
                outcome.append(None)
            except BaseException as e:  # noqa: BLE001 - handed back to the test
                outcome.append(e)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(self.TIMEOUT_S)
        if thread.is_alive():
            deadline = time.monotonic() + 10
            while thread.is_alive() and time.monotonic() < deadline:
                self._release_fifos()
                thread.join(0.1)
            pytest.fail(f"{getattr(fn, '__name__', fn)} blocked for {self.TIMEOUT_S:.0f}s (it opened a FIFO "
                        f"instead of refusing it)")
        return outcome[0]

    def raises(self, exc: type, path: Path, fn: Callable, *args: Any, **kwargs: Any) -> str:
        """fn raises `exc` whose message names `path`; returns the message."""
        e = self.call(fn, *args, **kwargs)
        assert isinstance(e, exc), f"expected {exc.__name__}, got {e!r}"
        msg = str(e)
        assert str(path) in msg, msg
        return msg

    def _release_fifos(self) -> None:
        # Opening the write end (non-blocking: it fails unless a reader waits) lets a blocked
        # open() return; closing it at once makes the reader see end-of-file.
        for fifo in self.fifos:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()
        for d in self._dirs:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def specials():
    s = SpecialFiles()
    yield s
    s.close()


def assert_not_regular(msg: str, kind_words: str) -> None:
    assert "not a regular file" in msg and kind_words in msg, msg


@posix_only
def test_a_reader_blocked_on_a_fifo_fails_instead_of_hanging(tmp_path, specials):
    """The guard itself: a plain read of a FIFO (what a regressed reader does) is released."""
    specials.TIMEOUT_S = 0.5
    fifo = specials.make("fifo", tmp_path / "pipe")
    with pytest.raises(pytest.fail.Exception, match="blocked"):
        specials.call(fifo.read_text)


# -- regular_file --------------------------------------------------------------------------------
def test_regular_file_accepts_files_and_links_to_them(tmp_path):
    f = tmp_path / "a.json"
    f.write_text("{}")
    (tmp_path / "link.json").symlink_to(f)
    assert regular_file(str(f), "config") == f
    assert regular_file(tmp_path / "link.json", "config") == tmp_path / "link.json"


@pytest.mark.parametrize("name", ["missing.json", "file.txt/child.json"], ids=["missing", "parent-is-a-file"])
def test_regular_file_missing(tmp_path, name):
    (tmp_path / "file.txt").write_text("x")
    path = tmp_path / name
    with pytest.raises(FileNotFoundError, match="steering config .* does not exist") as info:
        regular_file(path, "steering config")
    assert str(path) in str(info.value)


@posix_only
@pytest.mark.parametrize("kind,words", SPECIAL_KINDS)
def test_regular_file_refuses_special_files(tmp_path, specials, kind, words):
    path = specials.make(kind, tmp_path / "thing.json")
    msg = specials.raises(ValueError, path, regular_file, path, "steering config")
    assert_not_regular(msg, words)
    assert msg.startswith(f"steering config {path} ")


@posix_only
def test_regular_file_uses_the_loaders_error(tmp_path, specials):
    class LoaderError(ValueError):
        pass

    path = specials.make("fifo", tmp_path / "cfg.json")
    e = specials.call(regular_file, path, "config", error=lambda p, problem: LoaderError(f"{p}: {problem}"))
    assert isinstance(e, LoaderError) and str(e) == f"{path}: config is not a regular file (it is a FIFO (named pipe))"


@posix_only
@pytest.mark.parametrize("kind,words", SPECIAL_KINDS)
def test_atomic_write_refuses_to_replace_special_files(tmp_path, specials, kind, words):
    # os.replace over a FIFO or a link to /dev/null would swap the special file for ours
    path = specials.make(kind, tmp_path / "out.json")
    before = os.lstat(path)
    with pytest.raises(FileExistsError, match="not a regular file") as info:
        atomic_write(path, lambda tmp: tmp.write_text("{}"))
    assert str(path) in str(info.value)
    after = os.lstat(path)
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"], "no temporary file left behind"


@posix_only
def test_dev_null_itself(specials):
    msg = specials.raises(ValueError, Path(os.devnull), read_json, os.devnull, "steering config")
    assert_not_regular(msg, "character device")


# -- loads_json ----------------------------------------------------------------------------------
def test_loads_json_depth_limit():
    ok = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert not json_too_deep(loads_json(ok))
    for text in ("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1), '{"a": ' * 101 + "1" + "}" * 101, DEEP):
        with pytest.raises(json.JSONDecodeError, match="nested too deeply") as info:
            loads_json(text)
        assert info.value.pos == (MAX_JSON_DEPTH if text[0] == "[" else 6 * MAX_JSON_DEPTH), text[:20]
    # brackets inside strings do not count
    assert loads_json(json.dumps({"s": "[" * 5000})) == {"s": "[" * 5000}
    assert json_too_deep(json.loads(DEEPISH)) and not json_too_deep(5)
    assert json_too_deep({"a": [1, {}]}, 2) and not json_too_deep({"a": [1, {}]}, 3)


@needs_digit_limit
def test_loads_json_integer_too_long():
    with pytest.raises(json.JSONDecodeError, match="integer too long") as info:
        loads_json('{"a": 1, "b": ' + LONG_INT + "}")
    assert info.value.pos == 14


# -- read_json (steering configs, manifests, training checkpoints) ---------------------------------
_BAD_JSON = [
    pytest.param(DEEP.encode(), "nested too deeply", id="deep-100k"),
    pytest.param(DEEPISH.encode(), "nested too deeply", id="deep-500"),
    pytest.param(("{\"a\": " + LONG_INT + "}").encode(), "integer too long", id="int-5000-digits",
                 marks=needs_digit_limit),
    pytest.param(b'{"a": "\xff\xfe"}', "not UTF-8", id="not-utf8"),
    pytest.param(b"{not json", "not valid JSON", id="malformed"),
]


@pytest.mark.parametrize("data,needle", _BAD_JSON)
def test_read_json_bad_content_names_the_file(tmp_path, data, needle):
    path = tmp_path / "config.json"
    path.write_bytes(data)
    with pytest.raises(ValueError) as info:
        read_json(path, "steering config")
    msg = str(info.value)
    assert f"steering config {path}" in msg and needle in msg, msg


def test_read_json_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="activation manifest .*nope.json does not exist"):
        read_json(tmp_path / "nope.json", "activation manifest")


@posix_only
@pytest.mark.parametrize("kind,words", SPECIAL_KINDS)
def test_read_json_refuses_special_files(tmp_path, specials, kind, words):
    path = specials.make(kind, tmp_path / "config.json")
    assert_not_regular(specials.raises(ValueError, path, read_json, path, "steering config"), words)


@posix_only
@pytest.mark.parametrize("content,kind,needle", [
    pytest.param(DEEP, None, "nested too deeply", id="deep"),
    pytest.param(b"\x80\x81", None, "not UTF-8", id="not-utf8"),
    pytest.param(None, "fifo", "not a regular file", id="fifo"),
    pytest.param(None, "directory", "not a regular file", id="directory"),
])
def test_steering_config_names_its_file(tmp_path, specials, content, kind, needle):
    path = tmp_path / "steer.json"
    if kind:
        specials.make(kind, path)
    else:
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    assert needle in specials.raises(ValueError, path, SafeDIGConfig.from_json, path)


# -- prompt files --------------------------------------------------------------------------------
GOOD_LINE = '{"id": "p0", "label": "safe", "prompt": "a red bicycle"}'


def _prompt_file(tmp_path: Path, second_line: str) -> Path:
    f = tmp_path / "prompts.jsonl"
    f.write_text(GOOD_LINE + "\n" + second_line + "\n")
    return f


_BAD_PROMPT_LINES = [
    pytest.param(DEEP, "not valid JSON (nested too deeply", id="deep-100k"),
    pytest.param('{"id": "p1", "label": "safe", "prompt": "x", "seed": ' + "[" * 500 + "]" * 500 + "}",
                 "nested too deeply", id="deep-500"),
    pytest.param('{"id": "p1", "label": "safe", "prompt": "x", "seed": ' + LONG_INT + "}", "integer too long",
                 id="seed-5000-digits", marks=needs_digit_limit),
    pytest.param('{"id": "p1", "label": "safe", "prompt": "x", "seed": ' + str(10 ** 400) + "}",
                 "'seed' must lie in", id="seed-beyond-torch"),
    pytest.param('{"id": "p1", "label": "safe", "prompt": "x", "seed": 1e999}', "'seed' must be an int",
                 id="seed-1e999"),
    pytest.param('{"id": "p1", "label": "safe", "embeddings": "e.safetensors", "prompt": ["x"]}',
                 "'prompt' must be a string", id="prompt-list"),
    pytest.param('{"id": "p1", "label": "safe", "embeddings": {"a": 1}}', "'embeddings' must be a string",
                 id="embeddings-dict"),
    pytest.param('{"id": "p1", "label": "safe", "prompt": "x", "embeddings_prefix": 3}',
                 "'embeddings_prefix' must be a string", id="prefix-int"),
]


@pytest.mark.parametrize("line,needle", _BAD_PROMPT_LINES)
def test_bad_prompt_line_names_file_and_line(tmp_path, line, needle):
    f = _prompt_file(tmp_path, line)
    with pytest.raises(ValueError) as info:
        load_prompts(f)
    msg = str(info.value)
    assert f"prompt file {f}, line 2: " in msg and needle in msg, msg


def test_prompt_file_not_utf8_names_file_and_line(tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_bytes(GOOD_LINE.encode() + b"\n" + b'{"id": "p1", "label": "safe", "prompt": "\xff"}\n')
    with pytest.raises(ValueError, match="line 2: not UTF-8 text") as info:
        load_prompts(f)
    assert str(f) in str(info.value)


def test_prompt_file_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompt file .*nope.jsonl does not exist"):
        load_prompts(tmp_path / "nope.jsonl")


@posix_only
@pytest.mark.parametrize("kind,words", SPECIAL_KINDS)
def test_prompt_file_refuses_special_files(tmp_path, specials, kind, words):
    path = specials.make(kind, tmp_path / "prompts.jsonl")
    msg = specials.raises(ValueError, path, load_prompts, path)
    assert_not_regular(msg, words)
    assert msg.startswith(f"prompt file {path} ")


def _embeddings_line(name: str) -> str:
    return json.dumps({"id": "p1", "label": "unsafe/nudity", "embeddings": name, "embeddings_prefix": "p1."})


@posix_only
@pytest.mark.parametrize("kind,words", SPECIAL_KINDS)
def test_embeddings_file_refuses_special_files(tmp_path, specials, kind, words):
    path = specials.make(kind, tmp_path / "embeds.safetensors")
    f = _prompt_file(tmp_path, _embeddings_line("embeds.safetensors"))
    msg = specials.raises(ValueError, path, load_prompts, f)
    assert_not_regular(msg, words)
    assert f"prompt file {f}, line 2: embeddings file {path} " in msg, msg


@pytest.mark.parametrize("data", [b"", b"not a safetensors file", None], ids=["empty", "garbage", "truncated"])
def test_unreadable_embeddings_file_names_it(tmp_path, data):
    path = tmp_path / "embeds.safetensors"
    if data is None:
        save_file({"p1.prompt_embeds": torch.zeros(4, 8)}, str(path))
        data = path.read_bytes()[:-5]
    path.write_bytes(data)
    f = _prompt_file(tmp_path, _embeddings_line("embeds.safetensors"))
    with pytest.raises(ValueError, match="line 2: embeddings file .* is not a readable safetensors file") as info:
        load_prompts(f)
    assert str(path) in str(info.value)


def test_good_prompt_file_still_loads(tmp_path):
    save_file({"p1.prompt_embeds": torch.zeros(4, 8)}, str(tmp_path / "embeds.safetensors"))
    f = _prompt_file(tmp_path, _embeddings_line("embeds.safetensors"))
    p0, p1 = load_prompts(f)
    assert (p0.prompt, p0.embeddings_prefix) == ("a red bicycle", "")
    assert p1.embeddings == (tmp_path / "embeds.safetensors").resolve() and p1.embeddings_prefix == "p1."
    assert p1.load_embeddings()["prompt_embeds"].shape == (1, 4, 8)
