from cache_format.commandline import run_cli

from .cli import cli

if __name__ == "__main__":
    run_cli(cli, "python -m train", "interrupted: checkpoints are kept; re-run to resume")
