"""What the three command lines share: one-line errors, the config flags, `--layers`,
progress bars on stderr, and a dask client.

`python -m harvest`, `python -m train` and `python -m cache_format` all run through `run_cli`,
so a failure a user can cause reads the same everywhere: one `error: ...` line naming the fix,
exit status 2, no traceback unless `--debug`.
"""

from __future__ import annotations

import contextlib
import errno
import sys
from collections.abc import Iterator
from typing import Any

from .config import ConfigError
from .errors import UserError


def run_cli(group, prog: str, interrupted: str = "interrupted") -> None:
    """Run a click group so that a UserError is one line on stderr and exit code 2.

    `--debug` anywhere on the command line keeps the traceback instead. `interrupted` is the
    line printed on Ctrl-C: each stage says what of its work survives.
    """
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
        print(f"error: {e.strerror or e}{where}; {os_error_fix(e)}", file=sys.stderr)
        sys.exit(2)


def os_error_fix(e: OSError) -> str:
    """The fix an OSError points to, by its errno: only a full disk is blamed on the disk."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free some space and re-run"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "check the permissions of the path, or choose a writable one"
    if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT, errno.EBUSY):
        return "check the path; if another process was using it at the same time, wait for it and re-run"
    return "check the path and re-run"


def config_options(f=None, *, layers: bool = True, cache_help: str = "Cache location (path or fsspec URL)."):
    """The flags every stage's commands take: --config, --profile, --cache, [--layers,] --set.

    Use bare (`@config_options`) or configured (`@config_options(layers=False, cache_help=...)`).
    """
    import click

    def wrap(f):
        f = click.option(
            "--set",
            "overrides",
            multiple=True,
            metavar="SECTION.KEY=VALUE",
            help="Override any pipeline.toml key with a TOML literal.",
        )(f)
        if layers:
            f = click.option(
                "--layers",
                default=None,
                metavar="N,N,...",
                help="Comma-separated layer numbers, as the model counts them.",
            )(f)
        f = click.option("--cache", default=None, metavar="URL", help=cache_help)(f)
        f = click.option("--profile", default=None, help="Apply [profile.NAME] from pipeline.toml (e.g. tiny).")(f)
        f = click.option(
            "--config",
            "config_path",
            default=None,
            metavar="PATH",
            help="pipeline.toml to read (default: ./pipeline.toml, else the packaged copy).",
        )(f)
        return f

    return wrap(f) if f is not None else wrap


def parse_layers(text: str | None) -> list[int] | None:
    """`--layers 11,31,55` → [11, 31, 55]; None stays None (the config decides)."""
    if text is None or text == "":
        return None
    try:
        layers = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"--layers {text!r}: expected comma-separated integers like 11,31,55") from None
    if not layers or any(x < 0 for x in layers):
        raise ConfigError(f"--layers {text!r}: layers are non-negative integers like 11,31,55")
    return layers


def progress_bar(total: int, desc: str, unit: str = "B", disable: bool | None = None):
    """A tqdm bar on stderr with rate and ETA (bytes in binary units) for a long operation."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=True,
        unit_divisor=1024 if unit == "B" else 1000,
        file=sys.stderr,
        leave=False,
        disable=disable,
    )


@contextlib.contextmanager
def dask_client(
    scheduler: str = "",
    *,
    n_workers: int = 1,
    threads_per_worker: int = 1,
    processes: bool = False,
    fix: str = "check the address",
) -> Iterator[Any]:
    """A client on `scheduler` if given (one line if it cannot be reached: `fix` says how),
    else on a LocalCluster of the given shape, closed when the block ends.

    Harvest (one process per GPU), analysis (threads sharing one SAE) and `stats` (threads over
    shards) need different local clusters but the same handling of an unreachable scheduler."""
    from dask.distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout=10)
        except (OSError, TimeoutError) as e:
            raise UserError(f"cannot reach the dask scheduler at {scheduler} ({e}); {fix}") from None
        with client:
            yield client
        return
    with (
        LocalCluster(
            n_workers=n_workers, threads_per_worker=threads_per_worker, processes=processes, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client
