"""`python -m cache_format ...`: the CLI, entered through run_cli (one-line errors)."""

from .cli import main

main()
