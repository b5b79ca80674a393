"""`python -m melange_sky.cli`: the same commands as `melange-sky`.

Only `melange-sky` (and `python -m melange_sky`) also holds a Ctrl-C during its first ~0.1 s of loading and exits 130:
here the package is loaded before this module runs.
"""
from melange_sky.cli import main

main()
