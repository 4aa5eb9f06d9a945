"""The two ways a command ends early on purpose: a problem the user can fix, and a diverged loss."""


class CliError(Exception):
    """A problem the user can fix; reported as one message, without a traceback."""

    def __init__(self, message, exit_code=2):
        super().__init__(message)
        self.exit_code = exit_code


class LossDiverged(Exception):
    """The training loss became infinite or NaN; training stops with exit code 1."""
