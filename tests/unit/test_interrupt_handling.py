"""A Ctrl-C is never lost, even when it lands while Python runs a finalizer."""

import gc
import os
import signal
import sys
import time

from iosea_wf import cli
from iosea_wf.errors import Interrupted


class _SlowToDie:
    """An object whose ``__del__`` takes a while, the way Ansible's templates' does."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.monotonic() + 0.05
        while time.monotonic() < deadline:  # the handler runs here, inside the finalizer
            pass


def _drop_and_wait_for_interrupt(holder: list, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    try:
        holder.clear()  # the last reference: __del__ runs here
        while time.monotonic() < deadline:
            time.sleep(0.001)
    except Interrupted:
        return True
    return False


def test_a_signal_during_a_finalizer_interrupts_the_command_all_the_same(capfd):
    previous = cli._interruptible()
    try:
        lost = not _drop_and_wait_for_interrupt([_SlowToDie()], 2.0)
        assert not lost, "the Ctrl-C that came during a __del__ was lost"
    finally:
        cli._restore(previous)
    assert "Traceback" not in capfd.readouterr().err
    assert sys.unraisablehook is not cli._interrupt_again_if_lost
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_other_exceptions_in_finalizers_are_still_reported(capfd):
    class Broken:
        def __del__(self):
            raise ValueError("broken finalizer")

    previous = cli._interruptible()
    try:
        obj = Broken()
        del obj
        gc.collect()
    finally:
        cli._restore(previous)
    assert "broken finalizer" in capfd.readouterr().err


def test_no_signal_is_sent_again_once_the_command_is_over():
    got = []
    old = signal.signal(signal.SIGINT, lambda *a: got.append(a))
    try:
        previous = cli._interruptible()
        obj = _SlowToDie()
        del obj
        cli._restore(previous)  # the command ended before the signal was sent again
        signal.signal(signal.SIGINT, lambda *a: got.append(a))
        time.sleep(0.1)
    finally:
        signal.signal(signal.SIGINT, old)
    assert got == []
