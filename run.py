"""Run one benchmark cell, or a sweep with -m: python run.py method=capkv budget=512."""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig

from capkv.cli import check_group_choices, in_multirun, run_from_config

log = logging.getLogger("run")
USER_ERRORS = (ValueError, FileNotFoundError)


def user_error(error: BaseException) -> BaseException | None:
    """The bad-input error behind ``error`` (Hydra wraps those raised while instantiating)."""
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    return error if isinstance(error, USER_ERRORS) else None


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        run_from_config(cfg)
    except (*USER_ERRORS, InstantiationException) as error:
        cause = user_error(error)
        if cause is None or in_multirun():
            raise  # a multirun reports each failed job in one line (capkv.callbacks)
        log.debug("bad input", exc_info=cause)
        sys.exit(f"error: {cause}")


if __name__ == "__main__":
    check_group_choices(sys.argv[1:])
    main()
