"""One exception type for every failure a user can cause.

CLIs catch `UserError` and print its message as one line (no traceback unless --debug;
`commandline.run_cli`), so every message must name the problem and the fix.
"""


class UserError(Exception):
    """A failure caused by input the user controls: config, URL, layer, file."""


class CacheError(UserError):
    """The URL is not a cache, or the cache does not hold what was asked for."""


class RemoteError(UserError):
    """A remote store stayed unreachable after retries."""
