"""The command line of every recipe, generated from its config dataclass (jsonargparse).

``--help`` shows every field with its docstring, ``--config file.yaml`` loads a file,
``--print_config`` prints the resolved config, dotted flags override (``--optim.blr 1.5e-4``).
"""

import logging
import sys
from dataclasses import fields
from typing import TypeVar

from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

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
    main_spec = getattr(sys.modules["__main__"], "__spec__", None)
    if prog is None and main_spec is not None:
        prog = f"python -m {main_spec.name}"
    parser = build_parser(config_cls, prog=prog, description=description)
    namespace = parser.parse_args(argv)
    _show_project_logs()
    try:
        built = parser.instantiate(namespace)
        config = config_cls(**{f.name: built[f.name] for f in fields(config_cls)})
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    namespace.pop("config", None)
    return config, parser.dump(namespace)


def _show_project_logs() -> None:
    """Our packages log what they do (a world built, a corrupt shard skipped) at INFO; show it on stderr."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
    for name in ("models", "datamodules", "trainers", "evaluation", "recipes"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
