"""Command-line flags and YAML files from the config fields of `engine.config`.

Every leaf field of a step config is one flag of the same name. Precedence: field default <
`--config file.yaml` < command-line flag. Unknown flags and keys raise `UserError`; so does a config
with problems, all of them listed at once: the parts' own checks (`cfg.problems()`, pure) and what the
config asks of this machine (`engine.preflight`). Nothing is rewritten after parsing; the parsed config
records which flags the user gave (`cfg.given`).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import textwrap
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from engine.config import PART_SECTIONS, SECTIONS
from engine.errors import UserError
from engine.helptext import HelpFormatter, default_note, names_default, show_default
from engine.preflight import default_dtype, preflight
from engine.runtime.atomic import write_atomically

C = TypeVar("C")


@functools.cache
def leaf_fields(config_cls: type) -> dict[str, tuple[str, dataclasses.Field, Any]]:
    """flag name -> (part attribute, field, resolved type), over every part of a step config."""
    out: dict[str, tuple[str, dataclasses.Field, Any]] = {}
    for part in dataclasses.fields(config_cls):
        part_cls = _part_types(config_cls)[part.name]
        hints = typing.get_type_hints(part_cls)
        for f in dataclasses.fields(part_cls):
            if f.name in out:
                raise TypeError(f"flag --{f.name} is declared twice ({out[f.name][0]}, {part.name})")
            out[f.name] = (part.name, f, hints[f.name])
    return out


@functools.cache
def flag_sections(config_cls: type) -> dict[str, tuple[str, ...]]:
    """--help section title -> its flags, in `SECTIONS` order (a field's own section, else its part's)."""
    found: dict[str, list[str]] = {}
    for name, (part, f, _) in leaf_fields(config_cls).items():
        found.setdefault(f.metadata.get("section") or PART_SECTIONS[part], []).append(name)
    unknown = sorted(set(found) - set(SECTIONS))
    if unknown:
        raise TypeError(f"{config_cls.__name__}: no --help section named {', '.join(unknown)} in SECTIONS")
    return {title: tuple(found[title]) for title in SECTIONS if title in found}


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(scalar type, optional?) for `int`, `float | None`, `list[str]`..."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag value is a UserError (one line, exit 2) like every other input error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message}; see --help")


def build_parser(config_cls: type, description: str = "") -> argparse.ArgumentParser:
    """The step's parser: one flag per config field, listed in the sections of `flag_sections`."""
    parser = _Parser(description=description, allow_abbrev=False, formatter_class=HelpFormatter,
                     usage="%(prog)s [-h] [--config FILE] [--flag VALUE ...]")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="YAML file of flag values (flat, or grouped by part); flags given here override it.")
    leaves = leaf_fields(config_cls)
    for title, names in flag_sections(config_cls).items():
        # argparse keeps descriptions as written here (the step's own keeps its examples): wrap this one.
        group = parser.add_argument_group(title, textwrap.fill(SECTIONS[title], 76))
        for name in names:
            _add_flag(group, name, *leaves[name][1:])
    return parser


def _add_flag(group: argparse._ArgumentGroup, name: str, f: dataclasses.Field, tp: Any) -> None:
    base, _ = _base_type(tp)
    # Defaults are SUPPRESSed so that only flags given on the command line override the YAML
    # (and `given` knows them); the help shows the field's default itself.
    help_text = f.metadata.get("help", "") + default_note(f.metadata.get("help", ""), _field_default(f))
    kwargs: dict[str, Any] = {"help": help_text.replace("%", "%%"), "default": argparse.SUPPRESS}
    if f.metadata.get("choices"):
        kwargs["choices"] = f.metadata["choices"]
    if base is bool:
        group.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, **kwargs)
    elif typing.get_origin(base) is list:
        group.add_argument(f"--{name}", nargs="*", type=typing.get_args(base)[0], **kwargs)
    else:
        group.add_argument(f"--{name}", type=base, **kwargs)


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Check a YAML value against the field type (YAML reads 1e-3 as a string)."""
    base, optional = _base_type(tp)
    if value is None:
        if optional:
            return None
        raise UserError(f"config key '{name}' cannot be null; give a value or remove the key")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            raise ValueError
        if typing.get_origin(base) is list:
            items = value if isinstance(value, list) else [value]
            return [typing.get_args(base)[0](v) for v in items]
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return base(value)
    except (TypeError, ValueError):
        raise UserError(f"config key '{name}': {value!r} is not a valid "
                        f"{getattr(base, '__name__', base)}") from None


def _read_yaml(path: str, config_cls: type) -> dict[str, Any]:
    """Flat keys (`zero_stage: 3`) or keys grouped under part names (`ds: {zero_stage: 3}`)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"--config {path} is not valid YAML{where}: {problem}; fix the file") from None
    if not isinstance(raw, dict):
        raise UserError(f"--config {path} must hold a mapping of flag names to values")
    parts = {f.name for f in dataclasses.fields(config_cls)}
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key in parts and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def parse_config(config_cls: type[C], argv: Sequence[str] | None = None, description: str = "") -> C:
    """Defaults < --config YAML < flags; then `check` the result. `cfg.given` holds the flags set
    on the command line or in the YAML file."""
    parser = build_parser(config_cls, description)
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        raise UserError(f"unknown flag(s) {' '.join(unknown)}; see --help for the flags of this step")
    cli = {k: v for k, v in vars(ns).items() if k != "config"}
    leaves = leaf_fields(config_cls)
    from_file = _read_yaml(ns.config, config_cls) if ns.config else {}
    bad = sorted(set(from_file) - set(leaves))
    if bad:
        raise UserError(f"--config {ns.config}: unknown key(s) {', '.join(bad)}; keys are flag names")
    values = {k: _coerce(k, v, leaves[k][2]) for k, v in from_file.items()}
    values.update(cli)
    for name, value in values.items():
        choices = leaves[name][1].metadata.get("choices")
        if choices and value not in choices:
            raise UserError(f"--{name} {value!r}: choose one of {', '.join(map(str, choices))}")
    return make_config(config_cls, values)


def build_config(config_cls: type[C], values: dict[str, Any] | None = None) -> C:
    """A step config from flat flag values, the rest at their field defaults; nothing is checked."""
    values = values or {}
    leaves = leaf_fields(config_cls)
    bad = sorted(set(values) - set(leaves))
    if bad:
        raise UserError(f"unknown config key(s) {', '.join(bad)}")
    per_part: dict[str, dict[str, Any]] = {}
    for name, (part, f, _) in leaves.items():
        per_part.setdefault(part, {})[name] = values[name] if name in values else _field_default(f)
    part_types = _part_types(config_cls)
    return config_cls(**{part: part_types[part](**kw) for part, kw in per_part.items()})


@functools.cache
def _part_types(config_cls: type) -> dict[str, type]:
    return typing.get_type_hints(config_cls)


def make_config(config_cls: type[C], values: dict[str, Any] | None = None) -> C:
    """Build a step config from flat flag values (the rest default; `given` = their names) and check it.
    A dtype left unset is this machine's (`preflight.default_dtype`)."""
    values = dict(values or {})
    cfg = build_config(config_cls, {"dtype": default_dtype(), **values})
    cfg.given = frozenset(values)
    check(cfg)
    return cfg


def check(cfg: Any) -> None:
    """Raise one UserError listing every problem of the config: its own and this machine's."""
    problems = cfg.problems() + preflight(cfg)
    if problems:
        raise UserError("invalid configuration:\n  - " + "\n  - ".join(problems))


def flag_table(config_cls: type) -> str:
    """The Markdown flag reference of a step, one table per --help section (the docs embed it; a test
    keeps the two equal)."""
    leaves = leaf_fields(config_cls)
    out: list[str] = []
    for title, names in flag_sections(config_cls).items():
        out += [f"### {title}", "", SECTIONS[title], "", "| flag | default | meaning |", "|---|---|---|"]
        for name in names:
            f = leaves[name][1]
            text = f.metadata.get("help", "").replace("|", "/")
            if f.metadata.get("choices"):
                text += " Choices: " + ", ".join(map(str, f.metadata["choices"])) + "."
            out.append(f"| `--{name}` | {_default_cell(f)} | {text} |")
        out.append("")
    return "\n".join(out)


def _default_cell(f: dataclasses.Field) -> str:
    """A table's default: the value, or a pointer to the text where "unset" would say less than it."""
    value = _field_default(f)
    if value in (None, [], "") and names_default(f.metadata.get("help", "")):
        return "see meaning"
    return "`" + show_default(value).replace("|", "\\|") + "`"


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config_yaml(cfg: Any, path: Path, notes: Sequence[str] = ()) -> None:
    """The resolved config as YAML, written to a temp file and renamed: a crash never leaves half of it.
    `notes` become comment lines at the top (what a default resolved to; a --config reading it ignores them)."""
    header = "".join(f"# {line}\n" for note in notes for line in note.splitlines())
    write_atomically(path, header + yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
