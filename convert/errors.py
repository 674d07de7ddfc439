"""The one exception type that checkpoint conversion raises for problems a user can fix.

Everything user-facing (a missing path, a directory that is not a checkpoint, an unreadable leaf, a missing optional
dependency) is reported as :class:`ConversionError`, so the CLI can print ``str(err)`` and exit without a traceback.
"""

from __future__ import annotations


class ConversionError(Exception):
    """A user-facing conversion problem, described in one line that names the paths or keys involved."""

    def __init__(self, message: object) -> None:
        # Messages often embed third-party errors (tensorstore's span several lines and carry a JSON spec); the CLI
        # prints a single line, so fold everything onto one.
        lines = (line.strip() for line in str(message).splitlines())
        super().__init__(" ".join(line for line in lines if line))
