"""Storage: how anything the harness writes reaches the disk (whole-file writes, locks).

The bottom layer: imports only the standard library, and every other layer may import it.
"""
