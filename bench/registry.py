"""The generic plugin registry behind the method, data set and model registries.

Each plugin kind subclasses :class:`Registry`, states its plugin contract in the subclass
docstring and implements :meth:`Registry.check`. Built-in plugins register with a decorator
when their package is imported; third-party plugins arrive through an entry-point group and
are checked against the same contract when they register.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Any

from ltbench.errors import PluginError


class Registry:
    """A name -> plugin table; subclasses set ``kind``, ``group`` and ``builtin``."""

    kind = "plugin"
    group = ""
    builtin = ""

    def __init__(self) -> None:
        self._entries: dict[str, Any] = {}
        self._origins: dict[str, str] = {}
        self._loaded = False

    def check(self, name: str, plugin: Any) -> None:
        """Raise PluginError when ``plugin`` breaks the contract of this kind."""

    def register(self, name: str | None = None, *, origin: str | None = None) -> Callable:
        """Decorator registering a plugin under ``name`` (default: its ``__name__``)."""

        def decorate(plugin: Any) -> Any:
            self.add(name or plugin.__name__, plugin, origin=origin)
            return plugin

        return decorate

    def add(self, name: str, plugin: Any, *, origin: str | None = None) -> None:
        """Register ``plugin`` under ``name`` after checking it against the contract."""
        origin = origin or getattr(plugin, "__module__", "?")
        if name in self._entries:
            raise PluginError(
                f"{self.kind} {name!r} is registered twice: by {self._origins[name]} and by "
                f"{origin}; rename one of them"
            )
        self.check(name, plugin)
        self._entries[name] = plugin
        self._origins[name] = origin

    def get(self, name: str) -> Any:
        """The plugin registered as ``name``; an unknown name lists the valid ones."""
        self.load()
        if name not in self._entries:
            raise PluginError(self.unknown_message(name))
        return self._entries[name]

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(name, self.names(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        return f"unknown {self.kind} {name!r}{hint}; valid {self.kind}s: {', '.join(self.names())}"

    def names(self) -> list[str]:
        self.load()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self.load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def describe(self, name: str) -> str:
        """One line saying what the plugin is (the first line of its docstring)."""
        doc = inspect.getdoc(self.get(name)) or ""
        return doc.splitlines()[0] if doc else ""

    def load(self) -> None:
        """Import the built-in plugins, then the entry-point group, once."""
        if self._loaded:
            return
        self._loaded = True
        if self.builtin:
            importlib.import_module(self.builtin)
        for entry in entry_points(group=self.group):
            origin = f"entry point {entry.name!r} of {entry.dist.name if entry.dist else '?'}"
            try:
                plugin = entry.load()
            except Exception as error:
                raise PluginError(f"{self.group}: cannot load {origin}: {error}") from error
            self.add(entry.name, plugin, origin=origin)


def keyword_options(factory: Callable, skip: tuple[str, ...] = ()) -> dict[str, inspect.Parameter]:
    """The typed keyword options of a plugin factory, without the names in ``skip``."""
    parameters = inspect.signature(factory, eval_str=True).parameters
    return {
        name: parameter
        for name, parameter in parameters.items()
        if name not in skip
        and name != "self"
        and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    }


def check_options(kind: str, name: str, factory: Callable, skip: tuple[str, ...] = ()) -> None:
    """Every option must have a type annotation and a default, so configs can be validated."""
    for option, parameter in keyword_options(factory, skip).items():
        if parameter.annotation is inspect.Parameter.empty:
            raise PluginError(f"{kind} {name!r}: option {option!r} needs a type annotation")
        if parameter.default is inspect.Parameter.empty:
            raise PluginError(f"{kind} {name!r}: option {option!r} needs a default value")


def resolve_options(
    kind: str, name: str, factory: Callable, given: dict[str, Any], skip: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Validate ``given`` against the factory's typed options; return them with defaults filled.

    Unknown names and ill-typed values raise ConfigError naming the option and listing the
    valid ones with their types and defaults.
    """
    import pydantic

    from ltbench.errors import ConfigError

    options = keyword_options(factory, skip)
    valid = (
        ", ".join(
            f"{option}: {_type_name(p.annotation)} = {p.default!r}" for option, p in options.items()
        )
        or "none"
    )
    unknown = sorted(set(given) - set(options))
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(options), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"{kind} {name!r} has no option {unknown[0]!r}{hint}; its options are: {valid}"
        )
    fields = {option: (p.annotation, p.default) for option, p in options.items()}
    schema = pydantic.create_model(
        f"{name}_options", __config__=pydantic.ConfigDict(extra="forbid"), **fields
    )
    try:
        return schema(**given).model_dump()
    except pydantic.ValidationError as error:
        problem = error.errors()[0]
        option = ".".join(str(part) for part in problem["loc"])
        raise ConfigError(
            f"{kind} {name!r}: option {option!r} got {problem.get('input')!r}: {problem['msg']}; "
            f"its options are: {valid}"
        ) from None


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
