"""``python -m capkv.figures``: see :mod:`capkv.figures.cli`."""

from capkv.figures.cli import main

main()
