"""`python -m hotpath.cli`: the `hotpath` command."""

from hotpath.cli import main

main()
