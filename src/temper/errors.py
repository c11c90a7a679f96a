"""The one line between a user's mistake and a bug.

`InputError` is bad input a user can fix (a file, a record, a flag, a directory): every command's
boundary (`temper.__main__`) prints it as one line naming the file, line or key and exits with 2.
Anything else escaping a command is a bug and keeps its traceback. Each stage's own error
(`ConfigError`, `DataError`, `CheckpointError`, ...) subclasses it, so callers still catch the narrow one.
"""


class InputError(ValueError):
    """Bad input: the message names the file and line, or the key, and says what is wrong with it.

    Always one line: a message that spans several (a parser's, a library's) is joined with " / "."""

    def __str__(self) -> str:
        return " / ".join(line.strip() for line in super().__str__().splitlines() if line.strip())
