"""The command line of every recipe, generated from its config dataclass (jsonargparse).

``--help`` shows every field with its docstring, ``--config file.yaml`` loads a file,
``--print_config`` prints the resolved config, dotted flags override (``--optim.blr 1.5e-4``).
"""

import logging
import os
import sys
from collections.abc import Callable
from dataclasses import fields
from typing import TypeVar

from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

from trainers.run import compute_started

set_parsing_settings(docstring_parse_attribute_docstrings=True)

C = TypeVar("C")


def build_parser(config_cls: type, prog: str, description: str) -> ArgumentParser:
    parser = ArgumentParser(prog=prog, description=description, exit_on_error=True, allow_abbrev=False)
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML file of settings (later flags override it).")
    parser.add_class_arguments(config_cls, fail_untyped=True, sub_configs=True)
    return parser


def parse_config(config_cls: type[C], argv: list[str] | None = None, prog: str | None = None,
                 description: str | None = None) -> tuple[C, str]:
    """Parse ``argv`` into ``config_cls``; returns the config and its resolved YAML.

    A value rejected by a config's own validation exits like any other bad flag: usage, then the
    reason, with status 2.
    """
    parser = build_parser(config_cls, prog=prog or _prog(), description=description)
    namespace = parser.parse_args(argv)
    _show_project_logs()
    try:
        built = parser.instantiate(namespace)
        config = config_cls(**{f.name: built[f.name] for f in fields(config_cls)})
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    namespace.pop("config", None)
    return config, parser.dump(namespace)


def run_command(main: Callable, config_cls: type, description: str | None, *, with_yaml: bool = True):
    """``python -m recipes.<name>``: parse the command line into ``config_cls`` and call ``main(config, yaml)`` (or
    ``main(config)``). Bad input found before compute (a missing run, a file of the wrong kind) ends with one line,
    ``<prog>: error: <reason>``, and status 2, as a bad flag does; an error once compute has begun
    (``trainers.run.compute_begins``), or any error with PRISM_TRACEBACK=1, keeps its traceback."""
    config, config_yaml = parse_config(config_cls, description=description)
    try:
        return main(config, config_yaml) if with_yaml else main(config)
    except (ValueError, FileNotFoundError) as err:
        if compute_started() or os.environ.get("PRISM_TRACEBACK"):
            raise
        sys.stderr.write(f"{_prog()}: error: {err}\n(PRISM_TRACEBACK=1 shows where it was raised)\n")
        raise SystemExit(2) from None


def _prog() -> str | None:
    main_spec = getattr(sys.modules["__main__"], "__spec__", None)
    return f"python -m {main_spec.name}" if main_spec is not None else None


def _show_project_logs() -> None:
    """Our packages log what they do (a world built, a corrupt shard skipped) at INFO; show it on stderr."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
    for name in ("models", "datamodules", "trainers", "evaluation", "recipes"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
