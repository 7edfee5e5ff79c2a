"""``python -m capkv.tasks.longbench [--repo R]``: download and unpack LongBench's ``data.zip``
into the cache once (e.g. on a login node, before a SLURM array whose nodes are offline), check
every file against the manifest, and print the folder."""

from __future__ import annotations

import argparse
import sys

from capkv.tasks.longbench.hub import HUB_REPO, hub_data_dir, read_manifest, verify


def main(argv: list[str] | None = None) -> None:
    """Prepare the cache; one ``error:`` line and exit status 1 when that fails."""
    parser = argparse.ArgumentParser(description="Download and unpack LongBench's data.zip.")
    parser.add_argument("--repo", default=HUB_REPO, help=f"hub dataset (default {HUB_REPO})")
    args = parser.parse_args(argv)
    try:
        folder = hub_data_dir(args.repo, [])
        verify(folder, sorted(read_manifest(folder)), args.repo)
    except ValueError as error:
        sys.exit(f"error: {error}")
    print(folder)


if __name__ == "__main__":
    main()
