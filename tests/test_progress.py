"""Progress bars on stderr and the one-time note that a Triton backend runs interpreted."""

import io

import pytest

from fatrain import progress as progress_module
from fatrain.progress import note_interpreter, progress, progress_bar, progress_enabled


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def tty_stderr(monkeypatch):
    """A terminal as stderr. NOTE: set in the test's own phase through a callable, because
    pytest's output capture puts its own sys.stderr back between a fixture's set-up and the test."""
    monkeypatch.delenv("FATRAIN_PROGRESS", raising=False)

    def attach():
        err = _Terminal()
        monkeypatch.setattr("sys.stderr", err)
        return err
    return attach


def test_bar_on_a_terminal_names_the_work_and_counts(tty_stderr):
    err = tty_stderr()
    assert list(progress(range(3), desc="evaluating lengths", unit="length")) == [0, 1, 2]
    shown = err.getvalue()
    assert "evaluating lengths" in shown and "/3" in shown and "length/s" in shown


def test_fatrain_progress_0_turns_the_bar_off(tty_stderr, monkeypatch):
    err = tty_stderr()
    monkeypatch.setenv("FATRAIN_PROGRESS", "0")
    assert list(progress(range(3), desc="x")) == [0, 1, 2]
    assert err.getvalue() == ""
    assert not progress_enabled(10)


def test_no_bar_for_one_item_or_without_a_terminal(tty_stderr, monkeypatch):
    err = tty_stderr()
    assert list(progress([7], desc="one")) == [7]
    assert err.getvalue() == ""
    not_a_terminal = io.StringIO()
    monkeypatch.setattr("sys.stderr", not_a_terminal)
    assert list(progress(range(4), desc="piped")) == [0, 1, 2, 3]
    assert not_a_terminal.getvalue() == ""
    monkeypatch.setenv("FATRAIN_PROGRESS", "1")  # forced on, into a log file
    assert list(progress(range(4), desc="forced")) == [0, 1, 2, 3]
    assert "forced" in not_a_terminal.getvalue()


def test_generator_without_len_and_manual_bar(tty_stderr):
    err = tty_stderr()
    assert list(progress((i for i in range(2)), desc="gen")) == [0, 1]
    assert "gen" in err.getvalue()
    with progress_bar("max context naive", unit="try") as bar:
        bar.set_postfix_str("seq_len 1024")
        bar.update()
    assert "max context naive" in err.getvalue()


def test_manual_bar_off_is_silent(tty_stderr, monkeypatch):
    err = tty_stderr()
    monkeypatch.setenv("FATRAIN_PROGRESS", "0")
    with progress_bar("quiet") as bar:
        bar.update()
        bar.set_postfix_str("x")
    assert err.getvalue() == ""


def test_interpreter_note_once_per_triton_backend(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(progress_module, "_noted_backends", set())
    assert note_interpreter("flash_v2")
    assert not note_interpreter("flash_v2")
    assert not note_interpreter("naive")  # no Triton kernels
    err = capsys.readouterr().err
    assert err.count("flash_v2 runs its Triton kernels through the Triton interpreter") == 1
    assert "naive" not in err


def test_no_interpreter_note_when_triton_compiles(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(progress_module, "_noted_backends", set())
    assert not note_interpreter("flash_v1")
    assert capsys.readouterr().err == ""
