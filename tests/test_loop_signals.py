"""The local cluster registers a child before a Ctrl-C can unwind past it (signals_deferred)."""

from __future__ import annotations

import os
import signal

import pytest

from flywheel.loop.local import signals_deferred


def test_an_interrupt_inside_is_raised_on_exit_by_the_previous_handler():
    reached = []
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)  # a second signal inside is not delivered twice
            reached.append("after the signals")  # the block runs to its end: the child gets registered
    assert reached == ["after the signals"]
    assert signal.getsignal(signal.SIGINT) is previous


def test_nothing_pending_changes_nothing():
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with signals_deferred():
        pass
    assert {sig: signal.getsignal(sig) for sig in previous} == previous
