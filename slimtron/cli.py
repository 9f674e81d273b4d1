"""What the command-line tools share: a user mistake ends a tool with one line on stderr."""
import sys
from typing import Callable


def run_tool(name: str, work: Callable[[], object]) -> int:
    """Run a tool's ``work``: exit code 0, or 1 after printing a ``ValueError`` (a ConfigError, a
    damaged file or checkpoint) as the one line ``{name}: error: ...`` on stderr."""
    try:
        work()
    except ValueError as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        return 1
    return 0
