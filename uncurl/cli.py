"""What every command line shares: a problem with its input (a bad setting, a missing or wrong
file, a folder another process is writing) ends it with one line on stderr that names the problem
and the fix, and exit status 1, never a traceback. Library functions raise; only commands exit."""

import sys
from contextlib import contextmanager

from uncurl.layout import FolderInUse

INPUT_ERRORS = (ValueError, FileNotFoundError, FolderInUse)


@contextmanager
def one_line_errors(prog: str):
    """Turn an input error raised in the block into `prog: error: ...` and exit status 1."""
    try:
        yield
    except INPUT_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(1)
