"""Tests of `vaekl.progress`: which updates log a line, and what the line says."""

import logging

import pytest

from vaekl import progress


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "absl"]


@pytest.mark.parametrize("seconds,text", [
    (0.25, "0.25 s"), (4.2, "4.2 s"), (42.4, "42 s"), (185, "3 min 05 s"),
    (7380, "2 h 03 min")])
def test_durations_read_as_a_person_writes_them(seconds, text):
    assert progress.format_duration(seconds) == text


def test_the_first_and_the_last_update_log_and_at_most_one_line_every_period(caplog):
    clock = FakeClock()
    p = progress.Progress("eval", 100, unit="batches", every_s=10.0, clock=clock)
    logged = []
    with caplog.at_level(logging.INFO):
        for i in range(100):
            clock.now += 1.0  # One batch a second: 100 s in all.
            logged.append(p.advance(1) and i + 1)
    assert [n for n in logged if n] == [1, 11, 21, 31, 41, 51, 61, 71, 81, 91, 100]
    assert len(lines(caplog)) == 11


def test_the_rate_and_eta_leave_out_the_first_update(caplog):
    clock = FakeClock()
    p = progress.Progress("eval (IWAE-5000)", 10, unit="batches", every_s=0.0, clock=clock)
    with caplog.at_level(logging.INFO):
        clock.now += 30.0  # The first batch: compilation and the batch.
        p.advance(1)
        clock.now += 2.0
        p.advance(1)
        clock.now += 16.0
        p.advance(8, elbo=-95.123456)
    first, second, last = lines(caplog)
    assert first == "eval (IWAE-5000): 1/10 batches (10%) in 30 s (with compilation)"
    # 1 batch in the 2 s since the first: 2 s each, 8 left.
    assert second == "eval (IWAE-5000): 2/10 batches (20%), 2 s each, ETA 16 s"
    assert last == "eval (IWAE-5000): 10/10 batches (100%) in 48 s, 2 s each; elbo -95.12"


def test_without_warmup_the_rate_counts_from_a_resumed_start(caplog):
    clock = FakeClock()
    p = progress.Progress("train", 1000, unit="steps", done=400, first_is_warmup=False,
                          clock=clock)
    with caplog.at_level(logging.INFO):
        clock.now += 2.0
        p.advance(100, loss=95.5)
    assert lines(caplog) == ["train: 500/1000 steps (50%), 50 steps/s, ETA 10 s; loss 95.5"]


def test_short_work_stays_quiet(caplog):
    clock = FakeClock()
    p = progress.Progress("eval", 3, unit="batches", quiet_s=5.0, clock=clock)
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            clock.now += 1.0
            assert not p.advance(1)
    assert lines(caplog) == []
    slow = progress.Progress("eval", 3, unit="batches", quiet_s=5.0, clock=clock)
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            clock.now += 3.0
            slow.advance(1)
    # Quiet for the first 5 s, then the line due and the last.
    assert [line.split(":")[1].split()[0] for line in lines(caplog)] == ["2/3", "3/3"]
