"""The one user-facing error type: a single line that names the file or flag and the fix."""


class InvdiffError(Exception):
    """Bad input or a missing optional dependency. The CLI prints it as one line and exits with code 2."""
