"""Progress reporting: plain lines outside a terminal, library output routed to a stage's log."""

import io
import logging
import warnings

from edm_lightning.progress import Progress, format_seconds, stage_log


def test_outside_a_terminal_progress_writes_a_line_per_period_and_one_at_the_end():
    stream = io.StringIO()
    with Progress(100, "buying", "queries", initial=20, stream=stream, every_s=0.0) as progress:
        progress.update(30)
        progress.update(50)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2  # close() does not repeat a state already written
    assert lines[0].startswith("    buying: 50/100 queries (") and "ETA" in lines[0]
    assert lines[1].startswith("    buying: 100/100 queries (") and "done in" in lines[1]


def test_a_quiet_period_still_ends_with_the_final_line():
    stream = io.StringIO()
    with Progress(10, "buying", "queries", stream=stream, every_s=3600) as progress:
        progress.update(4)
        progress.update(6)
    assert stream.getvalue().splitlines() == [line for line in stream.getvalue().splitlines() if "10/10" in line]
    assert len(stream.getvalue().splitlines()) == 1


def test_nothing_done_writes_nothing():
    stream = io.StringIO()
    Progress(10, "buying", stream=stream, initial=10).close()
    assert stream.getvalue() == ""


def test_stage_log_takes_lightning_records_and_warnings_then_gives_them_back(tmp_path, capsys):
    logger = logging.getLogger("lightning.pytorch")
    handlers = logger.handlers[:]
    with stage_log(tmp_path / "stage.log"):
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info("GPU available: False")
        warnings.warn("a deprecation nobody asked to see", DeprecationWarning, stacklevel=1)
    text = (tmp_path / "stage.log").read_text()
    assert "GPU available: False" in text and "a deprecation nobody asked to see" in text
    assert "GPU available" not in capsys.readouterr().err
    assert logger.handlers == handlers


def test_seconds_read_as_a_person_would_say_them():
    assert [format_seconds(s) for s in (5, 75, 3700, float("nan"))] == ["5s", "1m15s", "1h01m", "?"]
