"""``python -m capkv.results [results]``: rebuild the tables of a results folder."""

from capkv.results.tables import main

main()
