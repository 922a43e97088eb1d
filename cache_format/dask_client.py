"""One way to get a dask client: now in cache_format.commandline."""

# shim: removed by the structure issue's last step
from .commandline import dask_client

__all__ = ["dask_client"]
