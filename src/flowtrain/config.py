"""The run's config tree: typed sections, loaded from YAML, adjusted by dotted overrides, validated at once.

A run is described by one RunConfig (model, data, optim, schedule, clip, train, log). Files in configs/ are
partial trees over the defaults; `key.sub=value` overrides are parsed as YAML scalars. Every problem (unknown
key, wrong type, impossible value) becomes a ConfigError naming the key and, for typos, the nearest valid key,
before any work starts.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from flowtrain._base import Section
from flowtrain.data.config import DataConfig
from flowtrain.errors import ConfigError
from flowtrain.flow.config import FlowConfig
from flowtrain.flow.guard import GuardConfig
from flowtrain.model.config import ARCHITECTURE_FIELDS, ModelConfig
from flowtrain.optim.config import ClipConfig, OptimConfig, ScheduleConfig
from flowtrain.train.config import LogConfig, TrainConfig
from flowtrain.train.faults import FaultConfig


class RunConfig(Section):
    """Everything that defines a run."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    clip: ClipConfig = Field(default_factory=ClipConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    flow: FlowConfig = Field(default_factory=FlowConfig)
    guard: GuardConfig = Field(default_factory=GuardConfig)
    fault: FaultConfig = Field(default_factory=FaultConfig)

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.schedule.kind != "inverse_sqrt" and self.schedule.min_lr > self.optim.lr:
            raise ValueError(f"schedule.min_lr={self.schedule.min_lr} is above optim.lr={self.optim.lr}; lower min_lr")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def shipped_config_names() -> list[str]:
    """Names of the configs that ship inside the package (configs/*.yaml)."""
    folder = resources.files("flowtrain") / "configs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if not path.suffix and name_or_path in shipped_config_names():
        text = (resources.files("flowtrain") / "configs" / f"{name_or_path}.yaml").read_text()
        source = f"shipped config {name_or_path!r}"
    else:
        if not path.is_file():
            raise ConfigError(
                f"config {name_or_path!r} not found; give a YAML path or one of: {', '.join(shipped_config_names())}"
            )
        text = read_text(path, "save it as UTF-8")
        source = str(path)
    tree = parse_yaml(text, source, "fix its syntax")
    tree.pop("base", None)
    return tree


def read_text(path: Path, fix: str) -> str:
    """A config file's text, or a ConfigError in one line: unreadable, or not UTF-8 (then `fix` says what to do)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}); {fix}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path} ({exc.strerror or exc}); check the path and its permissions") from None


def parse_yaml(text: str, source: str, fix: str) -> dict[str, Any]:
    """A YAML mapping of config sections, or a ConfigError in one line naming `source` and saying `fix`."""
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source} is not valid YAML ({problem}{where}); {fix}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(
            f"{source} must be a mapping of sections (model:, data:, ...), not {type(tree).__name__}; {fix}"
        )
    return tree


def _valid_keys(section: type[Section] = RunConfig, prefix: str = "") -> list[str]:
    keys = []
    for name, field in section.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, Section):
            keys.extend(_valid_keys(sub, dotted + "."))
    return keys


def _nearest_key(dotted: str) -> str:
    match = difflib.get_close_matches(dotted, _valid_keys(), n=1, cutoff=0.5)
    if not match:  # try the last component alone, anywhere in the tree
        leaf = dotted.rsplit(".", 1)[-1]
        leaves = {k.rsplit(".", 1)[-1]: k for k in _valid_keys()}
        close = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
        match = [leaves[close[0]]] if close else []
    return f"; did you mean {match[0]!r}?" if match else ""


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _string_field(dotted: str) -> bool:
    """Whether the config field at `dotted` holds free text (so `run_name=off` stays "off", not YAML's False;
    fields that choose among words get theirs back from Section's validator)."""
    section: Any = RunConfig
    *parents, leaf = dotted.split(".")
    for part in parents:
        field = section.model_fields.get(part) if isinstance(section, type) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, Section)):
            return False
        section = field.annotation
    field = section.model_fields.get(leaf)
    return field is not None and field.annotation in (str, str | None)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`a.b=1 c.d=[x,y]` → nested dict; values are YAML scalars/lists (so 3e-4, true, null work).

    Text fields take the raw text, so names like `off`, `yes` or `1e3` are not turned into booleans or numbers.
    """
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or key.strip() != key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value (e.g. optim.lr=3e-4)")
        if _string_field(key) and raw not in ("null", "~"):
            value: Any = raw
        else:
            try:
                value = yaml.safe_load(raw) if raw != "" else ""
            except yaml.YAMLError:
                value = raw
        _set_dotted(tree, key, value)
    return tree


def _format_validation_error(exc: ValidationError) -> str:
    errors = exc.errors()
    err = errors[0]
    # a union field (e.g. flow.interval: a positive int or "auto") reports one error per choice, each with
    # the choice's name appended to the location: name the field, and list what each choice wanted
    fields = [
        p
        for p in err["loc"]
        if not (
            isinstance(p, str) and (p.startswith(("constrained-", "literal[")) or p in ("int", "str", "float", "bool"))
        )
    ]
    loc = ".".join(str(p) for p in fields)
    choices = [e for e in errors if tuple(e["loc"][: len(fields)]) == tuple(fields)]
    if len(choices) > 1 and len(err["loc"]) > len(fields):
        wanted = " or ".join(dict.fromkeys(e["msg"].removeprefix("Value error, ") for e in choices))
        return f"invalid config value for {loc!r} (got {err.get('input')!r}): {wanted}"
    if err["type"] == "extra_forbidden":
        hint = _nearest_key(loc)
        if not hint and "." not in loc:
            hint = f"; the sections are {', '.join(RunConfig.model_fields)}"
        return f"unknown config key {loc!r}{hint}"
    msg = err["msg"].removeprefix("Value error, ")
    if not loc:
        return f"invalid config: {msg}"
    if isinstance(err.get("input"), dict):  # a whole-section check (e.g. n_embd vs n_head)
        return f"invalid config section {loc!r}: {msg}"
    return f"invalid config value for {loc!r} (got {err.get('input')!r}): {msg}"


def build_config(tree: dict[str, Any]) -> RunConfig:
    """Validate a nested dict into a RunConfig, or raise ConfigError with one readable line."""
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None


def _architecture_replaced(tree: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """A file's model section describes a model built from scratch: an override model.init_from replaces its
    architecture (and block_size) by the source's, so those keys go. Next to init_from in the same file they
    stay, and must agree with the source (interop/init_from.py)."""
    model = tree.get("model")
    if not (isinstance(over.get("model"), dict) and over["model"].get("init_from") and isinstance(model, dict)):
        return tree
    if model.get("init_from"):
        return tree
    kept = {k: v for k, v in model.items() if k not in (*ARCHITECTURE_FIELDS, "block_size")}
    return {**tree, "model": kept}


def _build_naming_the_file(
    tree: dict[str, Any], overrides: list[str], source: str, fix: str = "", fresh: bool = True
) -> RunConfig:
    """build_config of the file's tree with the overrides; an error the file alone has names the file. `fresh`:
    the file describes a run to start (a run's own config.yaml is what ran: init_from replaces nothing there)."""
    over = parse_overrides(overrides)
    tree = _architecture_replaced(tree, over) if fresh else tree
    try:
        return build_config(_merge(tree, over))
    except ConfigError as exc:
        if over:
            try:
                build_config(tree)
            except ConfigError:
                pass  # the file alone is invalid: name it
            else:
                raise  # the file is fine, an override is not: the message names the key
        raise ConfigError(f"{source}: {exc}" + (f"; {fix}" if fix else "")) from None


def load_config(config: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """The config named (shipped name or YAML path; default: `default`), with overrides applied."""
    tree = _read_yaml(config or "default")
    return _build_naming_the_file(tree, overrides or [], f"config {config or 'default'}")


def load_run_config(path: Path, overrides: list[str] | None = None, restore_from: Path | None = None) -> RunConfig:
    """The config a run directory or checkpoint recorded (`path`: its config.yaml), with overrides applied.

    flowtrain writes every section, so a missing one means the file was cut short. A damaged file is named, with
    `restore_from` (a checkpoint's verified copy) as the fix where there is one."""
    fix = f"restore it from {restore_from}" if restore_from else "restore it from a checkpoint's config.yaml"
    tree = parse_yaml(read_text(path, fix), str(path), fix)
    missing = [name for name in RunConfig.model_fields if name not in tree]
    if missing:
        raise ConfigError(f"{path} is incomplete (no {missing[0]}: section; truncated?); {fix}")
    return _build_naming_the_file(tree, overrides or [], str(path), fix, fresh=False)
