"""What a command's exit status means (the same for every command)."""

EXIT_OK = 0
EXIT_JOB_FAILED = 1  # the job failed or was cancelled
EXIT_USAGE = 2  # bad usage or input
EXIT_UNREACHABLE = 3  # the server could not be reached (or could not serve)


class CommandError(Exception):
    """Ends the command with one line on stderr and ``exit_code``."""

    exit_code = EXIT_USAGE


class UsageError(CommandError):
    exit_code = EXIT_USAGE


class JobFailed(CommandError):
    exit_code = EXIT_JOB_FAILED


class Unreachable(CommandError):
    exit_code = EXIT_UNREACHABLE
