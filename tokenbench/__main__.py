"""``python -m tokenbench``, which is also what ``accelerate launch -m tokenbench`` runs."""

from tokenbench.cli import main

main()
