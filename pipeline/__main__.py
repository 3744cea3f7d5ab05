"""``python -m pipeline``: same as the ``pipeline`` console script."""

from .cli import main

main(prog_name="pipeline")
