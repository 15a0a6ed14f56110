import io
import os

from cnnkit.progress import PlainProgress, progress_bar


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()  # not a terminal, like a CI log
    bar = progress_bar(10, desc="epoch 1/3", unit="batch", file=out)
    assert isinstance(bar, PlainProgress)
    bar.every = 0  # print at every update here; 30 s in real use
    bar.set_postfix(loss="1.234", acc="0.500")
    bar.update(4)
    bar.update(6)  # the last update prints nothing: the caller prints the epoch's summary
    bar.close()
    assert out.getvalue() == "epoch 1/3  4/10 batch  loss 1.234  acc 0.500\n"


def test_plain_lines_are_rate_limited():
    out = io.StringIO()
    bar = progress_bar(1000, desc="x", file=out)
    for _ in range(999):
        bar.update(1)
    assert out.getvalue() == ""  # well under 30 seconds: nothing yet


def test_a_terminal_gets_a_tqdm_bar_and_quiet_gets_nothing():
    read, write = os.openpty()
    with os.fdopen(write, "w") as terminal:
        bar = progress_bar(5, file=terminal)
        assert type(bar).__name__ == "tqdm" and not bar.disable
        bar.close()
        assert progress_bar(5, file=terminal, enabled=False).disable
    os.close(read)
    out = io.StringIO()
    quiet = progress_bar(5, file=out, enabled=False)
    quiet.update(5)
    quiet.close()
    assert out.getvalue() == ""
