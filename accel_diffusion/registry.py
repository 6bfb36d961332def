"""Component registry: name -> component class, per kind, with a config model per component.

A component's configuration *is* its constructor's keyword arguments. The registry derives a strict
pydantic model from the constructor signature (type hints, defaults and ``Annotated`` constraints),
so every component validates its parameters, round-trips through JSON and publishes a JSON Schema
without a hand-written schema next to it.

    @register_component("guidance", "cfg")
    class CfgGuidance(Guidance):
        def __init__(self, scale: Annotated[float, Field(ge=0)] = 7.5) -> None: ...
"""

from __future__ import annotations

import importlib
import inspect
import threading
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

import pydantic
from pydantic import BaseModel, ConfigDict

from accel_diffusion.errors import InvalidRequestError, UnknownComponentError, UnknownFieldError


class ComponentKind(StrEnum):
    SAMPLER = "sampler"
    SCHEDULE = "schedule"
    GUIDANCE = "guidance"
    STUDENT = "student"
    RUNTIME = "runtime"


# Modules whose import registers the built-in components of each kind.
_BUILTIN_COMPONENT_MODULES = (
    "accel_diffusion.samplers.diffusers_baselines",
    "accel_diffusion.samplers.deis",
    "accel_diffusion.samplers.heavy_ball",
    "accel_diffusion.samplers.ghvb",
    "accel_diffusion.samplers.ddpm",
    "accel_diffusion.schedules.spacing",
    "accel_diffusion.schedules.karras",
    "accel_diffusion.schedules.explicit",
    "accel_diffusion.schedules.searched",
    "accel_diffusion.schedules.disa",
    "accel_diffusion.guidance.none",
    "accel_diffusion.guidance.cfg",
    "accel_diffusion.guidance.apg",
    "accel_diffusion.guidance.rcfg",
    "accel_diffusion.parallel.component",
    "accel_diffusion.students.component",
)


@dataclass(frozen=True)
class ComponentInfo:
    kind: ComponentKind
    name: str
    cls: type
    config_model: type[BaseModel]
    summary: str

    def json_schema(self) -> dict[str, Any]:
        schema = self.config_model.model_json_schema()
        schema["title"] = f"{self.kind.value}:{self.name}"
        schema["description"] = self.summary
        return schema

    def parameters(self) -> list[dict[str, Any]]:
        """One row per constructor argument: name, type, default, constraints (for listings)."""
        rows = []
        props = self.config_model.model_json_schema().get("properties", {})
        for field_name, field in self.config_model.model_fields.items():
            prop = dict(props.get(field_name, {}))
            rows.append(
                {
                    "name": field_name,
                    "type": _type_label(field.annotation),
                    "default": None if field.is_required() else field.get_default(),
                    "required": field.is_required(),
                    "constraints": {k: prop[k] for k in _CONSTRAINT_KEYS if k in prop},
                    "description": field.description or "",
                }
            )
        return rows


_CONSTRAINT_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minItems", "maxItems")


def _type_label(annotation: Any) -> str:
    """A short human-readable type: ``float``, ``'zero' | 'sigma_min'``, ``list[int]``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin is typing.Annotated:
        return _type_label(args[0])
    if origin is not None and args:
        name = getattr(origin, "__name__", str(origin).replace("typing.", ""))
        return f"{name}[{', '.join(_type_label(a) for a in args)}]"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _config_model_for(cls: type, kind: ComponentKind, name: str) -> type[BaseModel]:
    signature = inspect.signature(cls.__init__)
    hints = typing.get_type_hints(cls.__init__, include_extras=True)
    fields: dict[str, Any] = {}
    for param in signature.parameters.values():
        if param.name == "self":
            continue
        if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise TypeError(f"component {kind}:{name} must not take *args/**kwargs: its config is its arguments")
        if param.name == "name":
            raise TypeError(f"component {kind}:{name} may not have a parameter called 'name'")
        annotation = hints.get(param.name, Any)
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[param.name] = (annotation, default)
    model_name = "".join(part.capitalize() for part in f"{kind.value}_{name}".split("_")) + "Config"
    return pydantic.create_model(  # type: ignore[call-overload]
        model_name,
        __config__=ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True),
        **fields,
    )


T = TypeVar("T", bound=type)


class ComponentRegistry:
    """Maps (kind, name) to a component class and its derived config model."""

    def __init__(self) -> None:
        self._components: dict[ComponentKind, dict[str, ComponentInfo]] = {k: {} for k in ComponentKind}

    def register(self, kind: str | ComponentKind, name: str) -> Callable[[T], T]:
        kind = ComponentKind(kind)

        def decorator(cls: T) -> T:
            if name in self._components[kind]:
                raise ValueError(f"{kind}:{name} is already registered by {self._components[kind][name].cls}")
            summary = inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0].replace("\n", " ")
            config_model = _config_model_for(cls, kind, name)
            self._components[kind][name] = ComponentInfo(kind, name, cls, config_model, summary)
            cls.component_kind = kind  # type: ignore[attr-defined]
            cls.component_name = name  # type: ignore[attr-defined]
            return cls

        return decorator

    def names(self, kind: str | ComponentKind) -> list[str]:
        return sorted(self._components[ComponentKind(kind)])

    def info(self, kind: str | ComponentKind, name: str, field: str | None = None) -> ComponentInfo:
        kind = ComponentKind(kind)
        try:
            return self._components[kind][name]
        except KeyError:
            choices = self.names(kind)
            raise UnknownComponentError(
                field or f"strategy.{kind.value}.name",
                f"unknown {kind.value} {name!r}"
                + ("" if choices else f"; no {kind.value} components are available yet"),
                choices or None,
            ) from None

    def all(self) -> list[ComponentInfo]:
        return [info for kind in ComponentKind for _, info in sorted(self._components[kind].items())]

    def normalize(self, kind: str | ComponentKind, spec: str | Mapping[str, Any]) -> dict[str, Any]:
        """Validate a component spec (``"ddim"`` or ``{"name": "ddim", "eta": 0}``) into its full form.

        Returns ``{"name": ..., **every constructor argument}`` with defaults filled in, JSON-safe.
        """
        name, _, config = self._validate(kind, spec)
        return {"name": name, **config.model_dump(mode="json")}

    def build(self, kind: str | ComponentKind, spec: str | Mapping[str, Any]) -> Any:
        """Instantiate a component from a (possibly partial) spec; a new object on every call."""
        return self._validate(kind, spec)[1]

    def _validate(self, kind: str | ComponentKind, spec: str | Mapping[str, Any]) -> tuple[str, Any, BaseModel]:
        """(name, a new instance, its validated config). Building the instance runs the checks that span
        several arguments (raised by the constructor), so those fail here too, at the edge."""
        kind = ComponentKind(kind)
        where = f"strategy.{kind.value}"
        if isinstance(spec, str):
            spec = {"name": spec}
        if not isinstance(spec, Mapping):
            raise InvalidRequestError(where, f"must be a component name or an object with 'name', got {spec!r}")
        params = dict(spec)
        name = params.pop("name", None)
        if not isinstance(name, str):
            raise InvalidRequestError(f"{where}.name", "is required and must be a string", self.names(kind))
        info = self.info(kind, name, field=f"{where}.name")
        try:
            config = info.config_model.model_validate(params)
        except pydantic.ValidationError as exc:
            raise validation_error_to_request_error(exc, prefix=f"{where}", info=info) from None
        instance = info.cls(**{k: getattr(config, k) for k in info.config_model.model_fields})
        return name, instance, config


def validation_error_to_request_error(
    exc: pydantic.ValidationError,
    prefix: str = "",
    info: ComponentInfo | None = None,
    model: type[BaseModel] | None = None,
) -> InvalidRequestError:
    """Turn pydantic's error list into one InvalidRequestError naming the first bad field.

    With ``info`` (a component) or ``model`` (any pydantic model) the allowed range or choices come
    from that model's schema, so the message states the whole range, not only the bound violated.
    """
    model = info.config_model if info is not None else model
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if p != "__root__")
    field = ".".join(p for p in (prefix, loc) if p) or "request"
    message = first["msg"].removeprefix("Value error, ")
    allowed: str | None = None
    ctx = first.get("ctx") or {}
    if first["type"] == "extra_forbidden":
        params = list(model.model_fields) if model is not None else []
        what = f"parameter for {info.kind.value} {info.name!r}" if info is not None else "field"
        unknown = UnknownFieldError(str(first["loc"][-1]), params, what)  # "did you mean `eta`?"
        message = unknown.message
        allowed = (", ".join(params) if params else "no parameters") if model is not None else None
    elif first["type"] == "finite_number":
        message = "must be a finite number (not NaN or infinity)"
    elif "expected" in ctx:
        allowed = str(ctx["expected"])
    if allowed is None and model is not None and first["loc"] and str(first["loc"][0]) in model.model_fields:
        bounds = {}
        for constraint in model.model_fields[str(first["loc"][0])].metadata:
            for key in ("ge", "gt", "le", "lt"):
                if getattr(constraint, key, None) is not None:
                    bounds[key] = getattr(constraint, key)
        allowed = _range_text(bounds) or None
    if allowed is None and any(k in ctx for k in ("ge", "gt", "le", "lt")):
        allowed = _range_text(ctx)
    if len(exc.errors()) > 1:
        message += f" (and {len(exc.errors()) - 1} more error(s))"
    return InvalidRequestError(field, message, allowed)


def _range_text(ctx: Mapping[str, Any]) -> str:
    low = f"{'>=' if 'ge' in ctx else '>'} {ctx.get('ge', ctx.get('gt'))}" if ("ge" in ctx or "gt" in ctx) else ""
    high = f"{'<=' if 'le' in ctx else '<'} {ctx.get('le', ctx.get('lt'))}" if ("le" in ctx or "lt" in ctx) else ""
    return " and ".join(p for p in (low, high) if p)


_REGISTRY = ComponentRegistry()
_builtins_loaded = False
_builtins_lock = threading.Lock()


def register_component(kind: str | ComponentKind, name: str) -> Callable[[T], T]:
    """Class decorator registering a component in the process-wide registry."""
    return _REGISTRY.register(kind, name)


def get_registry() -> ComponentRegistry:
    """The process-wide registry with every built-in component loaded."""
    global _builtins_loaded
    if not _builtins_loaded:
        with _builtins_lock:
            if not _builtins_loaded:
                for module in _BUILTIN_COMPONENT_MODULES:
                    importlib.import_module(module)
                _builtins_loaded = True
    return _REGISTRY
