"""``python -m pipeline.cli``: the same as the ``commpipe`` console script."""

from pipeline.cli.main import main

main()
