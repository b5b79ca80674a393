"""Jinja templates → SkyPilot task configs, one per replica.

Templates are plain Jinja files (`templates/*.j2`: `vllm`, `sglang`) or any file the user names. They render with
`StrictUndefined`, so a variable the template needs but the plan does not provide is an error naming it, never an
empty string in a YAML that would launch the wrong thing. The builtin templates put values into YAML through the
`tojson` filter (a JSON scalar is a YAML scalar), so no model name or env value can break or inject YAML structure.

A template may come from a config someone shared (`deployment.template`), so every template renders in Jinja's
immutable sandbox: it cannot reach Python (no `__globals__`, no `os`) nor change the values it is given, and an
attempt is a one-line error naming the template. A replica's rendered `resources` must ask for the offer the plan bound
(`bind_resources`): a template cannot launch another GPU, cloud or market than the one the plan priced.
"""
from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from melange_sky.errors import TemplateError

TEMPLATE_SUFFIX = ".j2"
#: Characters YAML (1.1, PyYAML) reads as line breaks, and others it will not take raw: JSON leaves them unescaped
#: with ensure_ascii=False, so `tojson` escapes them itself. A raw U+2028 in a `# comment` line would end the
#: comment and start a new YAML line (a key injected from a fleet or GPU name).
_YAML_UNSAFE = re.compile("[\u007f-\u009f\u2028\u2029\ufeff\ud800-\udfff]")
#: Line breaks a shell word inside a YAML block scalar (`run: |`) cannot hold: the next line would leave the block.
LINE_BREAKS = re.compile("[\n\r\u0085\u2028\u2029]")


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
    return Path(__file__).resolve().parents[2] / "templates"


#: Builtin templates that are not a replica's (`router.j2` renders the fleet's router task).
INTERNAL_TEMPLATES = frozenset({"router"})


def builtin_templates() -> list[str]:
    """The builtin replica templates a config or --template may name."""
    return sorted(name for p in builtin_template_dir().glob(f"*{TEMPLATE_SUFFIX}")
                  if (name := p.name[: -len(TEMPLATE_SUFFIX)]) not in INTERNAL_TEMPLATES)


def load_template(name_or_path: str) -> Template:
    """A builtin template by name (`vllm`, `sglang`) or a template file by path."""
    path = Path(name_or_path)
    if not (path.suffix or "/" in name_or_path or path.exists()):
        builtin = builtin_template_dir() / f"{name_or_path}{TEMPLATE_SUFFIX}"
        if not builtin.is_file():
            raise TemplateError(f"template {name_or_path!r}: no such builtin template; choose one of "
                                f"{', '.join(builtin_templates())} or give a file path")
        path = builtin
    elif path.is_dir():
        raise TemplateError(f"template {name_or_path}: is a directory, not a template file; give a file path or a "
                            f"builtin name ({', '.join(builtin_templates())})")
    elif not path.is_file():
        raise TemplateError(f"template {name_or_path}: no such file")
    return Template(name=name_or_path, path=path, jinja=_compile(str(path.resolve())))


@lru_cache(maxsize=32)
def _compile(path: str):
    import jinja2  # noqa: PLC0415 - heavy: kept off `--help`
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: PLC0415

    # Sandboxed: a template (possibly from a shared config) cannot reach Python (`lipsum.__globals__["os"]`), any
    # attribute starting with `_`, or a method that changes the plan's values; it renders text, nothing more.
    env = ImmutableSandboxedEnvironment(loader=jinja2.FileSystemLoader(str(Path(path).parent)),
                                        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    env.filters["tojson"] = _to_json
    env.filters["shell_quote"] = _shell_quote
    try:
        return env.get_template(Path(path).name)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"{path}:{exc.lineno}: template syntax error: {exc.message}") from None
    except (jinja2.TemplateNotFound, OSError, UnicodeDecodeError) as exc:
        raise TemplateError(f"{path}: cannot read template: {exc}") from None


def render(template: Template, context: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The rendered YAML text and the task config it parses to (a mapping, checked)."""
    import jinja2  # noqa: PLC0415 - heavy: kept off `--help`
    import yaml  # noqa: PLC0415 - heavy: kept off `--help`
    from jinja2.sandbox import SecurityError  # noqa: PLC0415

    try:
        text = template.jinja.render(**context)
    except SecurityError as exc:
        raise TemplateError(f"{_where(exc, template)}: refused: {str(exc).rstrip('.')} (templates render in a "
                            f"sandbox: they read the plan's variables and cannot reach Python or change those "
                            f"values)") from None
    except jinja2.UndefinedError as exc:
        raise TemplateError(f"{_where(exc, template)}: undefined template variable: {exc.message}; available: "
                            f"{', '.join(sorted(context))}") from None
    except jinja2.TemplateNotFound as exc:
        raise TemplateError(f"{_where(exc, template)}: includes {exc.name!r}, which is not a file of the "
                            f"template's own directory ({template.path.resolve().parent})") from None
    except jinja2.TemplateError as exc:
        raise TemplateError(f"{template.path}: rendering failed: {exc}") from None
    except (TypeError, ValueError, ArithmeticError, LookupError, AttributeError) as exc:
        # A template's own mistake ({{ port + "x" }}, {{ 1 / 0 }}) or a value a filter refuses: name the line.
        raise TemplateError(f"{_where(exc, template)}: rendering failed: {type(exc).__name__}: {exc}") from None
    try:  # libyaml's loader where PyYAML has it: the pure-Python one is 90% of the time of a 100-replica plan
        task = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (rendered line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise TemplateError(f"{template.path}: renders invalid YAML{where}: {problem}") from None
    if not isinstance(task, dict):
        raise TemplateError(f"{template.path}: renders {type(task).__name__}, expected a YAML mapping (a SkyPilot "
                            f"task with resources, setup and run)")
    return text, task


@dataclass(frozen=True)
class BoundOffer:
    """What the plan bound a replica to and priced: the resources its rendered task must ask for."""

    accelerators: str  # "A10G:1"
    cloud: str | None = None
    region: str | None = None
    instance_type: str | None = None
    use_spot: bool = False

    def describe(self) -> str:
        where = " ".join(p for p in (self.cloud, self.region, self.instance_type) if p)
        return (f"{self.accelerators}{f' on {where}' if where else ' (no cloud pinned)'}"
                f"{', spot' if self.use_spot else ', on-demand'}")


#: `infra: k8s/ctx` names the Kubernetes cloud as SkyPilot does.
_CLOUD_ALIASES = {"k8s": "kubernetes"}


def bind_resources(template: Template, text: str, task: dict[str, Any], cluster: str,
                   offer: BoundOffer) -> tuple[str, dict[str, Any]]:
    """The rendered task asking for exactly `offer`: each of accelerators, cloud, region, instance_type and use_spot
    the template renders must equal the offer's, and one it leaves out is filled in from the offer (the YAML text is
    then written again from the task, so the file still launches what the plan priced). A template rendering another
    GPU, count, cloud, region, instance type or market, alternatives (`any_of`, `ordered`), several nodes, or no
    `resources` at all is refused: `up` would launch something the plan never priced, and its dry run would call it
    validated."""
    def refuse(what: str, hint: str = "") -> TemplateError:
        return TemplateError(f"{template.path} renders {what} for {cluster}, but the plan bound "
                             f"{offer.describe()}{hint}")

    resources = task.get("resources")
    if resources is None:
        raise refuse("no resources", "; without them SkyPilot launches a CPU instance of its choice (the builtin "
                                     "templates show the resources block)")
    if not isinstance(resources, dict):
        raise refuse(f"resources as a {type(resources).__name__}, not a mapping")
    for key in ("any_of", "ordered"):
        if key in resources:
            raise refuse(f"resources.{key} (alternatives)", "; a replica runs on the one offer its plan priced")
    nodes = task.get("num_nodes")
    if nodes is not None and nodes != 1:
        raise refuse(f"num_nodes {_shown(nodes)}", "; the plan prices one instance per replica")
    filled = dict(resources)
    value = resources.get("accelerators")
    if value is None:
        filled["accelerators"] = offer.accelerators
    elif _accelerator(value) != _accelerator(offer.accelerators):
        raise refuse(f"resources.accelerators {_shown(value)}")
    infra = resources.get("infra")
    if infra is not None:
        parts = [None if part in ("", "*") else part for part in str(infra).split("/", 2)]
        given = dict(zip(("cloud", "region"), parts))
        given["cloud"] = given["cloud"] and _CLOUD_ALIASES.get(given["cloud"].lower(), given["cloud"].lower())
        for key in ("cloud", "region"):
            if given.get(key) is not None and given[key] != getattr(offer, key):
                raise refuse(f"resources.infra {_shown(infra)}")
        if any(given.get(key) is None and getattr(offer, key) for key in ("cloud", "region")):
            zone = parts[2] if len(parts) > 2 and offer.region else None
            filled["infra"] = "/".join(p for p in (offer.cloud, offer.region, zone) if p)
    for key in ("cloud", "region", "instance_type"):
        value, bound = resources.get(key), getattr(offer, key)
        if value is None:
            if bound is not None and not (key != "instance_type" and infra is not None):
                filled[key] = bound
            continue
        same = (_CLOUD_ALIASES.get(str(value).lower(), str(value).lower()) == bound if key == "cloud"
                else str(value) == bound)
        if not same:
            raise refuse(f"resources.{key} {_shown(value)}")
    value = resources.get("use_spot")
    if value is None:
        if offer.use_spot:
            filled["use_spot"] = True
    elif value is not offer.use_spot:
        raise refuse(f"resources.use_spot {_shown(value)}")
    if filled == resources:
        return text, task
    task = {**task, "resources": filled}
    return _dump_task(template, text, task), task


def _accelerator(value: Any) -> tuple[str, float] | None:
    """(name, count) of one SkyPilot `accelerators` value ("A10G", "a10g:1", {"A10G": 1}); None for anything else
    (a list or several names: alternatives). SkyPilot reads GPU names case-insensitively."""
    if isinstance(value, dict) and len(value) == 1:
        ((name, count),) = value.items()
    elif isinstance(value, str) and value.strip():
        name, _, count = value.strip().partition(":")
    else:
        return None
    try:
        number = float(count) if count not in (None, "") else 1.0
    except (TypeError, ValueError):
        return None
    return str(name).strip().lower(), number


def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, str) else json.dumps(value, default=str)


def _dump_task(template: Template, text: str, task: dict[str, Any]) -> str:
    """The task as YAML, after its resources were completed: the template's leading comments, a note of what was
    added, then the task (multi-line strings as `|` blocks, as templates write `run:`)."""
    import yaml  # noqa: PLC0415 - heavy: kept off `--help`

    class _Dumper(yaml.SafeDumper):
        pass

    def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    _Dumper.add_representer(str, _str)
    header = []
    for line in text.split("\n"):
        if not line.startswith("#"):
            break
        header.append(line)
    header.append("# resources completed by melange-sky with the plan's offer (the template leaves some out).")
    body = yaml.dump(task, Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False, width=120)
    # The template's own comments go along only where they stay comments (a raw U+2028 in one would end it).
    for dumped in ("\n".join(header) + "\n" + body, f"{header[-1]}\n{body}"):
        if yaml.safe_load(dumped) == task:
            return dumped
    raise TemplateError(f"{template.path}: the task, with its resources completed from the plan's offer, does not "
                        f"read back the same as YAML; give the resources in the template")


def _to_json(value: Any) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; YAML wants plain JSON, with YAML's extra line breaks and
    # non-printable characters escaped (JSON's \uXXXX is also a YAML double-quoted escape).
    return _YAML_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(value, ensure_ascii=False))


def _shell_quote(value: Any) -> str:
    text = str(value)
    if LINE_BREAKS.search(text):
        raise ValueError(f"shell_quote: {text!r} contains a line break, which cannot stay inside the task's "
                         f"`run:`/`setup:` block")
    return shlex.quote(text)


def _where(exc: BaseException, template: Template) -> str:
    """`path:line` of the template line an exception was raised from, or the path when no line is known."""
    line = _template_line(exc, template)
    return f"{template.path}:{line}" if line else str(template.path)


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
