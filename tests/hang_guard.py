"""A guard for tests of inputs that could block forever (a FIFO opened for reading waits for a writer)."""
import contextlib
import signal

HANG_LIMIT_S = 60  # far beyond any of these tests' real work, far below a CI job's limit


class Hung(Exception):
    """The block was still waiting after the limit: the code under test blocked instead of refusing."""


@contextlib.contextmanager
def fails_instead_of_hanging(seconds=HANG_LIMIT_S):
    """A call that blocks inside the block raises Hung after `seconds` (SIGALRM interrupts the system call), so a
    regression fails the test instead of stalling the whole run."""
    def alarm(signum, frame):
        raise Hung(f"blocked for {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
