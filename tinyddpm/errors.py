"""User-facing errors: one line on stderr, exit code 2, no traceback.

Library code raises `UserError` for anything the user can fix (a bad flag, a missing file, a foreign checkpoint).
Scripts wrap their `main` in `run_cli`, which turns it into the one-line message. Programming errors still
raise normally so they are never hidden.
"""
import argparse
import contextlib
import re
import signal
import sys
import threading

EXIT_USAGE = 2  # the exit code argparse uses for bad arguments; we use it for every user mistake
EXIT_SIGINT = 128 + signal.SIGINT  # the shell's convention: 128 + the signal's number
EXIT_SIGTERM = 128 + signal.SIGTERM


# A command-line value that looks like a negative number, ±inf or nan (-1, -0.5, -1e9, -inf, nan, …): argparse takes
# only -1 and -0.5 for values and anything else starting with "-" for an unknown option.
NUMBER_LIKE = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-?(inf|infinity|nan)$", re.IGNORECASE)


class UserError(Exception):
    """Something the user can fix. The message says what is wrong and what to do."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's one-line errors ('error: … (see PROG --help)', exit code 2, no usage block),
    and -inf, -1e9 or nan read as values, so the flag's own check says what is wrong with them."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NUMBER_LIKE  # argparse's rule for "a value, not an option"

    def error(self, message):
        self.exit(EXIT_USAGE, f"error: {message} (see {self.prog} --help)\n")


def _terminate(signum, frame):
    raise SystemExit(EXIT_SIGTERM)


@contextlib.contextmanager
def sigterm_unwinds():
    """While inside, SIGTERM raises SystemExit instead of killing the process on the spot, so `finally` blocks run
    and an atomic write removes its temporary file. (A loop that wants to stop gracefully, such as training, sets
    its own handler inside and restores this one after.)"""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    old = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _tolerate_undecodable_paths():
    """A path from the command line that is not UTF-8 reaches Python as lone surrogates, which a strict stdout
    cannot print; print them as escapes instead of crashing after the work is done."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def run_cli(main, argv=None, setup=None):
    """Run `setup()` (if given: a script's start-up, e.g. tinyddpm.cpu.configure), then `main(argv)`; a UserError
    from either becomes 'error: <message>' on stderr and exit code 2. SIGTERM unwinds like Ctrl-C (exit 143)."""
    _tolerate_undecodable_paths()
    try:
        with sigterm_unwinds():
            if setup is not None:
                setup()
            return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_SIGINT
    except SystemExit as e:  # argparse's exits pass through; SIGTERM (see sigterm_unwinds) ends like Ctrl-C
        if e.code != EXIT_SIGTERM:
            raise
        print("terminated", file=sys.stderr)
        return EXIT_SIGTERM
