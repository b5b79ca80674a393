"""`python -m melange_sky.cli`: the same as the `melange-sky` command."""
from melange_sky.cli import main

main()
