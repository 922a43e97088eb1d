"""Where a cache lives, behind one small interface (base.py): a local directory, an fsspec URL
(S3 and others), a published cache over HTTP or on the Hugging Face Hub, one backend module each.

`Location(url, storage_options)` returns the backend for the URL; importing this package
registers every backend.
"""

from .base import Location, ObjectInfo, ReadOnlyError, ShortRead, Upload, WriteFailed, key_problem
from .fsspec import FsspecLocation, S3Location
from .http import HttpLocation
from .hub import HubLocation
from .local import LocalLocation

__all__ = [
    "Location",
    "ObjectInfo",
    "ReadOnlyError",
    "ShortRead",
    "Upload",
    "WriteFailed",
    "key_problem",
    "LocalLocation",
    "FsspecLocation",
    "S3Location",
    "HttpLocation",
    "HubLocation",
]
