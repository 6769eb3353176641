"""The entry points' error contract: ``cli.run(main)`` in place of ``absl.app.run(main)``.

A user error -- the project's own exceptions, a bad value (ValueError, KeyError), an OS error
(missing file, permission, full disk), a diverged run -- ends the program with one line on stderr,
``error: <what, naming the file, field or plate>``, and exit status 1; a bad command line (e.g. an
unknown ``--config.`` key) likewise. ``--debug`` (or ``CSARM_DEBUG=1``) shows the traceback instead.
Any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Callable, NoReturn

from absl import app, flags

DEBUG_FLAG, DEBUG_ENV = '--debug', 'CSARM_DEBUG'
EXPECTED = (ValueError, KeyError, OSError, FloatingPointError)


class CommandLineError(Exception):
  """A flag the parser (absl or ml_collections) could not apply."""


def is_user_error(error: BaseException) -> bool:
  """The project's own errors and the expected ones; everything else is a bug."""
  return (isinstance(error, EXPECTED) or isinstance(error, CommandLineError) or
          type(error).__module__.split('.')[0] == 'csarm_jax')


def message(error: BaseException) -> str:
  """The error's text on one line (KeyError's quotes and escaped newlines undone)."""
  text = error.args[0] if len(error.args) == 1 and isinstance(error.args[0], str) else str(error)
  text = text.replace('\\n', '\n').replace("\\'", "'")
  while len(text) > 1 and text[0] == text[-1] and text[0] in '\'"':
    text = text[1:-1]
  if isinstance(error, KeyError) and text.isidentifier():     # a bare key says nothing alone
    text = f'missing key {text!r}'
  if isinstance(error, OSError) and error.strerror and error.filename:
    text = f'{error.strerror.lower()}: {error.filename}'
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  return '; '.join(lines) or type(error).__name__


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:                                         # absl's own, e.g. a bad value
    raise CommandLineError(f'{message(e)} (--helpfull lists the flags)') from e
  except (AttributeError, KeyError, TypeError, ValueError) as e:   # raised by config overrides
    text = message(e)
    key = re.match(r"'?([\w.]+)'?(;|$)", text)
    where = [a for a in argv[1:] if key and re.search(rf'\.{re.escape(key.group(1))}(=|$)', a)]
    if key and where:
      text = f'{where[0].split("=")[0]}: unknown config key {key.group(1)!r}{text[key.start(2):]}'
    raise CommandLineError(text) from e


def debugging(argv: list[str]) -> bool:
  return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, '') not in ('', '0')


def fail(error: BaseException) -> NoReturn:
  print(f'error: {message(error)}', file=sys.stderr, flush=True)
  sys.exit(1)


def run(main: Callable[[list[str]], object], argv: list[str] | None = None) -> None:
  """``app.run(main)`` with the error contract above."""
  argv = list(sys.argv if argv is None else argv)
  debug = debugging(argv)
  argv = [a for a in argv if a != DEBUG_FLAG]
  try:
    app.run(main, argv=argv, flags_parser=_parse_flags)
  except Exception as e:         # noqa: BLE001 -- sorted into user errors and bugs right here
    if debug or not is_user_error(e):
      raise
    fail(e)
