"""Errors that the CLI turns into one clear line and exit code 2."""


class UserError(Exception):
    """A mistake in the user's input (config value, path, data): shown without a traceback.

    The message must name the bad value and what is allowed.
    """

    exit_code = 2


def listed(names: list[str], limit: int = 3) -> str:
    """The first ``limit`` names, and how many more there are, for an error message."""
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
