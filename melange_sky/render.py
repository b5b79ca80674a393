"""Jinja templates → SkyPilot task configs, one per replica.

Templates are plain Jinja files (`templates/*.j2`: `vllm`, `sglang`) or any file the user names. They render with
`StrictUndefined`, so a variable the template needs but the plan does not provide is an error naming it, never an
empty string in a YAML that would launch the wrong thing. Values go into YAML through the `tojson` filter (a JSON
scalar is a YAML scalar), so no model name or env value can break or inject YAML structure.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from .errors import TemplateError

TEMPLATE_SUFFIX = ".j2"


@dataclass(frozen=True)
class Template:
    """A loaded template: the Jinja object plus where it came from, for error messages."""

    name: str  # a builtin name ("vllm") or the path the user gave
    path: Path
    jinja: Any


def builtin_template_dir() -> Path:
    """Where the builtin templates live: the installed `melange_sky/templates` package data, or `templates/` of a
    source checkout (the same files; setup.cfg maps one onto the other)."""
    try:
        installed = resources.files("melange_sky.templates")
        if installed.is_dir() and any(p.name.endswith(TEMPLATE_SUFFIX) for p in installed.iterdir()):
            return Path(str(installed))
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parent.parent / "templates"


def builtin_templates() -> list[str]:
    return sorted(p.name[: -len(TEMPLATE_SUFFIX)] for p in builtin_template_dir().glob(f"*{TEMPLATE_SUFFIX}"))


def load_template(name_or_path: str) -> Template:
    """A builtin template by name (`vllm`, `sglang`) or a template file by path."""
    path = Path(name_or_path)
    if not (path.suffix or "/" in name_or_path or path.exists()):
        builtin = builtin_template_dir() / f"{name_or_path}{TEMPLATE_SUFFIX}"
        if not builtin.is_file():
            raise TemplateError(f"template {name_or_path!r}: no such builtin template; choose one of "
                                f"{', '.join(builtin_templates())} or give a file path")
        path = builtin
    elif not path.is_file():
        raise TemplateError(f"template {name_or_path}: no such file")
    return Template(name=name_or_path, path=path, jinja=_compile(str(path.resolve())))


@lru_cache(maxsize=32)
def _compile(path: str):
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(Path(path).parent)), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, autoescape=False)
    env.filters["tojson"] = _to_json
    env.filters["shell_quote"] = lambda value: shlex.quote(str(value))
    try:
        return env.get_template(Path(path).name)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"{path}:{exc.lineno}: template syntax error: {exc.message}") from None
    except (jinja2.TemplateNotFound, OSError, UnicodeDecodeError) as exc:
        raise TemplateError(f"{path}: cannot read template: {exc}") from None


def render(template: Template, context: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The rendered YAML text and the task config it parses to (a mapping, checked)."""
    import jinja2
    import yaml

    try:
        text = template.jinja.render(**context)
    except jinja2.UndefinedError as exc:
        line = _template_line(exc, template)
        where = f"{template.path}:{line}" if line else str(template.path)
        raise TemplateError(f"{where}: undefined template variable: {exc.message}; available: "
                            f"{', '.join(sorted(context))}") from None
    except jinja2.TemplateError as exc:
        raise TemplateError(f"{template.path}: rendering failed: {exc}") from None
    try:
        task = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (rendered line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise TemplateError(f"{template.path}: renders invalid YAML{where}: {problem}") from None
    if not isinstance(task, dict):
        raise TemplateError(f"{template.path}: renders {type(task).__name__}, expected a YAML mapping (a SkyPilot "
                            f"task with resources, setup and run)")
    return text, task


def _to_json(value: Any) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; YAML wants plain JSON.
    return json.dumps(value, ensure_ascii=False)


def _template_line(exc: BaseException, template: Template) -> int | None:
    """The template line an exception was raised from: Jinja rewrites tracebacks to point into the template."""
    line = None
    tb = exc.__traceback__
    target = str(template.path.resolve())
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == target:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line
