"""`python -m did_cli`: the `did` command line."""

from did_cli.cli import main

main()
