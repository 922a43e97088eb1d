"""One exception type for every failure a user can cause.

CLIs catch `UserError` and print its message as one line (no traceback unless --debug),
so every message must name the problem and the fix.
"""


class UserError(Exception):
    """A failure caused by input the user controls: config, URL, layer, file."""


class CacheError(UserError):
    """The URL is not a cache, or the cache does not hold what was asked for."""


class RemoteError(UserError):
    """A remote store stayed unreachable after retries."""


def run_cli(group, prog: str) -> None:
    """Run a click group so that a UserError is one line on stderr and exit code 2.

    `--debug` anywhere on the command line keeps the traceback instead.
    """
    import sys

    debug = "--debug" in sys.argv
    if debug:
        sys.argv.remove("--debug")
    try:
        group.main(prog_name=prog, standalone_mode=False)
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: committed segments and checkpoints are kept; re-run to resume", file=sys.stderr)
        sys.exit(130)
    except OSError as e:
        if debug:
            raise
        print(f"error: {e.strerror or e} ({getattr(e, 'filename', '') or ''}); check the path and free space", file=sys.stderr)
        sys.exit(2)
