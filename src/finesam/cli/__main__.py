"""`python -m finesam.cli` (as torchrun -m runs it)."""

from finesam.cli import main

main()
