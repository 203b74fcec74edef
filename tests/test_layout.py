"""Atomic folders and folder locks: what an interruption leaves, who holds a folder."""

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT

from uncurl import layout

HOLD = """
import sys, time
from uncurl import layout
with layout.locked(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_locked_folder_is_refused_naming_its_holder_until_it_dies_even_by_sigkill(tmp_path):
    with subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    ) as holder:
        try:
            assert holder.stdout.readline() == "held\n"
            with pytest.raises(layout.FolderInUse) as refused, layout.locked(tmp_path):
                pytest.fail("two holders at once")
        finally:
            os.kill(holder.pid, signal.SIGKILL)  # no chance to release it
    message = str(refused.value)
    assert f"{tmp_path} is in use by pid {holder.pid} on {socket.gethostname()} since " in message
    assert "-c" in message and message.endswith("; wait for it to finish, or stop it")
    with layout.locked(tmp_path):  # the operating system released it with its holder
        assert layout.read_json(tmp_path / layout.LOCK_INFO)["pid"] == os.getpid()
    assert not (tmp_path / layout.LOCK_INFO).exists()


def test_waiting_for_a_lock_says_who_holds_it(tmp_path, caplog):
    held, release = threading.Event(), threading.Event()

    def hold():
        with layout.locked(tmp_path):
            held.set()
            release.wait()

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait()
    threading.Timer(0.3, release.set).start()
    started = time.perf_counter()
    with caplog.at_level(logging.WARNING), layout.locked(tmp_path, wait=True):
        assert time.perf_counter() - started >= 0.3
    thread.join()
    assert f"is in use by pid {os.getpid()}" in caplog.text and "waiting for it" in caplog.text


def _folder(path, text):
    path.mkdir()
    (path / "file").write_text(text)


def test_recovery_puts_back_only_a_folder_moved_aside_between_two_renames(tmp_path, caplog):
    path, old = tmp_path / "thing", layout.moved_aside(tmp_path / "thing")
    _folder(old, "previous")  # the process died between its two renames
    leftover = tmp_path / ".thing.0123456789ab.tmp"
    _folder(leftover, "half")
    with caplog.at_level(logging.WARNING):
        assert layout.recover_dir(path)
    assert (path / "file").read_text() == "previous"
    assert "put back the previous version from .thing.old" in caplog.text
    assert "died between its two renames" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing"]
    _folder(old, "previous")  # it died after the second rename: the new version stands
    caplog.clear()
    assert not layout.recover_dir(path)
    assert caplog.text == "" and sorted(p.name for p in tmp_path.iterdir()) == ["thing"]


def test_an_interrupted_replacement_changes_nothing(tmp_path):
    path = tmp_path / "thing"
    with layout.atomic_dir(path) as tmp:
        (tmp / "file").write_text("first")
    with pytest.raises(KeyboardInterrupt), layout.atomic_dir(path) as tmp:
        (tmp / "file").write_text("half")
        raise KeyboardInterrupt
    assert (path / "file").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing"]
