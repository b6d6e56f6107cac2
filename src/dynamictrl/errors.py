"""User-facing errors: one line naming the input and what is wrong, never a traceback."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


class UserError(Exception):
    """A problem with the user's input or configuration; shown as a single line."""


class Reject(Exception):
    """One input item is unusable; the run records it with this reason and carries on."""


@contextlib.contextmanager
def user_errors(stage: str) -> Iterator[None]:
    """Turn UserError (and missing files) into `<stage>: error: <message>` on stderr and exit code 2."""
    try:
        try:
            yield
        except Exception as err:  # Hydra's instantiate wraps a backend's UserError: show the error itself
            cause = err.__cause__
            if type(err).__name__ == "InstantiationException" and isinstance(cause, UserError):
                raise cause from None
            raise
    except (UserError, FileNotFoundError, NotADirectoryError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"{stage}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"{stage}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
