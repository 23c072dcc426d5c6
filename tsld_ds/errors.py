"""Errors a user can fix: reported as one clear line and a non-zero exit, without a traceback."""


class UsageError(Exception):
    """Bad input: a wrong path, a config that cannot work, mismatched teacher and student."""
