"""`python -m cvmig`: the same as the `cvmig` command."""

from cvmig.cli import main

main()
