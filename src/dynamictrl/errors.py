"""User-facing errors: one line naming the input and what is wrong, never a traceback."""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator, Mapping

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

from dynamictrl.utils.warnings import ignore_noise

MISSING = (MissingMandatoryValue, InterpolationToMissingValueError)  # a setting left `???` was read


class UserError(Exception):
    """A problem with the user's input or configuration; shown as a single line."""


class Reject(Exception):
    """One input item is unusable; the run records it with this reason and carries on."""


def not_set(keys: list[str], examples: Mapping[str, str]) -> str:
    """`KEY is not set (e.g. KEY=VALUE)` for settings left `???`, with the examples known for them."""
    shown = " ".join(f"{key}={examples[key]}" for key in keys if key in examples)
    verb = "is" if len(keys) == 1 else "are"
    return f"{' and '.join(keys)} {verb} not set" + (f" (e.g. {shown})" if shown else "")


def require(cfg: DictConfig, examples: Mapping[str, str]) -> None:
    """Stop before any work when a stage's mandatory setting (a full key of `examples`) is left `???`."""
    missing = []
    for key in examples:
        try:
            OmegaConf.select(cfg, key, throw_on_missing=True)
        except MISSING:
            missing.append(key)
    if missing:
        raise UserError(not_set(missing, examples))


def missing_key(err: MissingMandatoryValue | InterpolationToMissingValueError) -> str:
    """The full key of the setting left `???`, read directly or through an interpolation `${KEY}`."""
    if isinstance(err, InterpolationToMissingValueError):  # its full_key is the setting that refers to it
        return re.search(r"Missing mandatory value: (\S+)", str(err)).group(1)
    return err.full_key


@contextlib.contextmanager
def user_errors(stage: str, examples: Mapping[str, str] | None = None) -> Iterator[None]:
    """Turn UserError, missing files and settings left `???` into `<stage>: error: <message>` on stderr
    and exit code 2. `examples` maps a setting's full key to a value to suggest when it is missing.
    Every app runs inside it, so it also silences the third-party warnings known to be noise."""
    ignore_noise()
    try:
        yield
    except KeyboardInterrupt:
        print(f"{stage}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as raised:
        cause = raised.__cause__  # Hydra's instantiate wraps a backend's UserError: show the error itself
        wrapped = type(raised).__name__ == "InstantiationException" and isinstance(cause, (UserError, *MISSING))
        err = cause if wrapped else raised
        if isinstance(err, MISSING):
            message = not_set([missing_key(err)], examples or {})
        elif isinstance(err, (UserError, FileNotFoundError, NotADirectoryError)):
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
        else:
            raise
        print(f"{stage}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
