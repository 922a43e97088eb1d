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


def run_cli(group, prog: str, interrupted: str = "interrupted") -> None:
    """Run a click group so that a UserError is one line on stderr and exit code 2.

    `--debug` anywhere on the command line keeps the traceback instead. `interrupted` is the
    line printed on Ctrl-C: each stage says what of its work survives.
    """
    import sys

    import click

    debug = "--debug" in sys.argv
    if debug:
        sys.argv.remove("--debug")
    try:
        rv = group.main(prog_name=prog, standalone_mode=False)
        if isinstance(rv, int) and not isinstance(rv, bool) and rv:  # ctx.exit(code)
            sys.exit(rv)
    except click.exceptions.UsageError as e:  # a missing argument, an unknown option: one line too
        where = e.ctx.command_path if e.ctx is not None else prog
        print(f"error: {e.format_message()} (see {where} --help)", file=sys.stderr)
        sys.exit(2)
    except click.exceptions.ClickException as e:
        print(f"error: {e.format_message()}", file=sys.stderr)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(1)
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        sys.exit(130)
    except OSError as e:
        if debug:
            raise
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"error: {e.strerror or e}{where}; {_os_error_fix(e)}", file=sys.stderr)
        sys.exit(2)


def _os_error_fix(e: OSError) -> str:
    """The fix an OSError points to, by its errno: only a full disk is blamed on the disk."""
    import errno

    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free some space and re-run"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "check the permissions of the path, or choose a writable one"
    if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT, errno.EBUSY):
        return "check the path; if another process was using it at the same time, wait for it and re-run"
    return "check the path and re-run"
