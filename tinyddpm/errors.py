"""User-facing errors: one line on stderr, exit code 2, no traceback.

Library code raises `UserError` for anything the user can fix (a bad flag, a missing file, a foreign checkpoint).
Scripts wrap their `main` in `run_cli`, which turns it into the one-line message. Programming errors still
raise normally so they are never hidden.
"""
import sys

EXIT_USAGE = 2  # the exit code argparse uses for bad arguments; we use it for every user mistake


class UserError(Exception):
    """Something the user can fix. The message says what is wrong and what to do."""


def run_cli(main, argv=None, setup=None):
    """Run `setup()` (if given: a script's start-up, e.g. tinyddpm.cpu.configure), then `main(argv)`; a UserError
    from either becomes 'error: <message>' on stderr and exit code 2."""
    try:
        if setup is not None:
            setup()
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
