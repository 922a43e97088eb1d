"""`python -m harvest run ...`: the CLI (entered through run_cli: one-line errors)."""

from .cli import main

if __name__ == "__main__":
    main()
