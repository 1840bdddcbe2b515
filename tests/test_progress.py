import io

from lmlab import progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_track_yields_every_item_with_and_without_a_terminal(monkeypatch):
    assert list(progress.track(range(5), "x")) == [0, 1, 2, 3, 4]
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert list(progress.track(iter(range(5)), "counting", total=5)) == [0, 1, 2, 3, 4]
    with progress.status("working"):
        pass


def test_nothing_is_drawn_when_stderr_is_not_a_terminal(monkeypatch, capsys):
    list(progress.track(range(3), "quiet"))
    with progress.status("quiet"):
        pass
    assert capsys.readouterr().err == ""
