"""The one exception type for wrong input, and how the command line tells it from a bug.

:class:`UserInputError` is raised wherever a value the user chose is checked:
config fields, command-line options, files and their contents, data that
does not fit the model. Its message names the field, option or file and what
was expected. It is a ``ValueError``, so code that catches ``ValueError``
keeps working. The command line prints it as one line and exits with 2;
anything else that escapes is a bug (exit 1, with the traceback).
"""

from __future__ import annotations

import errno

#: OS errors caused by the paths or the machine the user chose, not by the code:
#: no such file, no permission, a file where a directory belongs (or the reverse), a full disk.
USER_OS_ERRNOS = frozenset({
    errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
    errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG,
})


class UserInputError(ValueError):
    """A value, option, file or data set the user gave is wrong; the message names it."""


class UserInputTypeError(UserInputError, TypeError):
    """A value the user gave has the wrong type (a ``TypeError`` too, as Python's own checks raise)."""


def is_user_error(exc: BaseException) -> bool:
    """True for wrong input (exit 2), False for a bug (exit 1)."""
    if isinstance(exc, UserInputError):
        return True
    path_errors = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
    return isinstance(exc, path_errors) or (isinstance(exc, OSError) and exc.errno in USER_OS_ERRNOS)


def describe(exc: BaseException) -> str:
    """``exc`` as the one line the command line prints."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = str(exc)
    return " ".join(text.split())  # one line, whatever the message held
