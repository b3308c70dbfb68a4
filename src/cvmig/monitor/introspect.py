"""query-qmp-schema: the schema of exactly what this monitor implements, in QEMU's
SchemaInfo format (qapi/introspect.json), so a tool that probes QEMU's schema (libvirt
does, before it uses a command or an argument) can probe cvmig's the same way.

Types are declared here with a few constructors; the parameters' come from the parameter
table (`cvmig.migration.parameters`). ``schema()`` names them as QEMU does: builtins by
their own names, arrays as ``[ELEMENT]``, every other type by an opaque number ("0" is the
empty object), so that clients follow references instead of relying on names. cvmig's
own ``x-`` members carry the feature ``unstable``, as QEMU marks its experimental ones.

``validate`` checks a value against a SchemaInfo list: tests hold every reply and event
to the schema the monitor itself serves.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Union

from cvmig.migration import parameters as P
from cvmig.migration.live import IN_PROGRESS

BUILTINS = {"str": "string", "int": "int", "number": "number", "bool": "boolean",
            "null": "null", "any": "value"}


@dataclass(frozen=True)
class Enum:
    values: tuple[str, ...]
    features: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (value, its features)


@dataclass(frozen=True)
class Array:
    element: Type


@dataclass(frozen=True)
class Alternate:
    choices: tuple[Type, ...]


@dataclass(frozen=True)
class Member:
    name: str
    type: Type
    optional: bool = False


@dataclass(frozen=True)
class Obj:
    members: tuple[Member, ...] = ()
    tag: str | None = None  # a union: the member whose value picks a variant
    variants: tuple[tuple[str, Obj], ...] = ()


Type = Union[str, Enum, Array, Alternate, Obj]  # noqa: UP007 - a forward-referenced alias


def obj(*members: Member, tag: str | None = None,
        variants: Iterable[tuple[str, Obj]] = ()) -> Obj:
    return Obj(tuple(members), tag, tuple(variants))


def req(name: str, t: Type) -> Member:
    return Member(name, t)


def opt(name: str, t: Type) -> Member:
    return Member(name, t, optional=True)


EMPTY = Obj()

# -- the types of what cvmig implements ------------------------------------------------
MIGRATION_STATUS = Enum(("none", "setup", "cancelling", "cancelled", "active", "completed",
                         "failed", "device"))
RUN_STATE = Enum(("inmigrate", "paused", "postmigrate", "prelaunch", "finish-migrate",
                  "running", "shutdown"))
RAM = obj(*(req(n, "number" if n == "mbps" else "int") for n in (
    "transferred", "remaining", "total", "duplicate", "normal", "normal-bytes",
    "dirty-pages-rate", "mbps", "dirty-sync-count", "postcopy-requests", "page-size",
    "multifd-bytes", "pages-per-second", "precopy-bytes", "downtime-bytes", "postcopy-bytes",
    "dirty-sync-missed-zero-copy")))
INET = obj(req("host", "str"), req("port", "str"), opt("ipv4", "bool"), opt("ipv6", "bool"))
SOCKET_ADDRESS = obj(req("type", Enum(("inet",))), tag="type", variants=[("inet", INET)])
MIGRATION_INFO = obj(
    opt("status", MIGRATION_STATUS), opt("ram", RAM), opt("total-time", "int"),
    opt("expected-downtime", "int"), opt("downtime", "int"), opt("setup-time", "int"),
    opt("cpu-throttle-percentage", "int"), opt("error-desc", "str"),
    opt("socket-address", Array(SOCKET_ADDRESS)),
    # cvmig's own
    opt("x-rounds", "int"),
    opt("x-psp", obj(req("commands", "int"), req("doorbells", "int"),
                     req("time-ms", "number"))),
    opt("x-throttle", "str"), opt("x-guest-gap", "int"), opt("x-in-doubt", "str"),
)
CAPABILITY = Enum(P.CAPABILITY_NAMES,
                  tuple((c.name, c.features) for c in P.CAPABILITIES if c.features))
CAPABILITY_STATUS = obj(req("capability", CAPABILITY), req("state", "bool"))


def _param_type(p: P.Param, setting: bool) -> Type:
    if p.kind == "enum":
        return Enum(p.choices)
    if p.kind == "str":
        return Alternate(("str", "null")) if setting and p.nullable else "str"
    return {"number": "number", "bool": "bool"}.get(p.kind, "int")


SET_PARAMETERS = obj(*(opt(p.name, _param_type(p, True)) for p in P.TABLE))
PARAMETERS = obj(*(req(p.name, _param_type(p, False)) for p in P.TABLE))  # always all

META_TYPE = Enum(("builtin", "enum", "array", "object", "alternate", "command", "event"))
STR_LIST = Array("str")
SCHEMA_INFO = obj(
    req("name", "str"), req("meta-type", META_TYPE), opt("features", STR_LIST),
    tag="meta-type", variants=[
        ("builtin", obj(req("json-type", Enum(("string", "number", "int", "boolean", "null",
                                               "object", "array", "value"))))),
        ("enum", obj(req("members", Array(obj(req("name", "str"),
                                              opt("features", STR_LIST)))),
                     req("values", STR_LIST))),
        ("array", obj(req("element-type", "str"))),
        ("object", obj(req("members", Array(obj(req("name", "str"), req("type", "str"),
                                                opt("default", "any"),
                                                opt("features", STR_LIST)))),
                       opt("tag", "str"),
                       opt("variants", Array(obj(req("case", "str"), req("type", "str")))))),
        ("alternate", obj(req("members", Array(obj(req("type", "str")))))),
        ("command", obj(req("arg-type", "str"), req("ret-type", "str"),
                        opt("allow-oob", "bool"))),
        ("event", obj(req("arg-type", "str"))),
    ])

# name -> (argument type, return type); the arguments cvmig takes, and no others
COMMANDS: dict[str, tuple[Obj, Type]] = {
    "qmp_capabilities": (obj(opt("enable", Array(Enum(("oob",))))), EMPTY),
    "query-version": (EMPTY, obj(
        req("qemu", obj(req("major", "int"), req("minor", "int"), req("micro", "int"))),
        req("package", "str"))),
    "query-commands": (EMPTY, Array(obj(req("name", "str")))),
    "query-qmp-schema": (EMPTY, Array(SCHEMA_INFO)),
    "query-status": (EMPTY, obj(req("running", "bool"), req("status", RUN_STATE),
                                opt("x-in-doubt", "str"))),
    "stop": (EMPTY, EMPTY),
    "cont": (EMPTY, EMPTY),
    "quit": (EMPTY, EMPTY),
    "migrate": (obj(opt("uri", "str"), opt("detach", "bool")), EMPTY),
    "migrate-incoming": (obj(opt("uri", "str"), opt("exit-on-error", "bool")), EMPTY),
    "migrate_cancel": (EMPTY, EMPTY),
    "query-migrate": (EMPTY, MIGRATION_INFO),
    "migrate-set-parameters": (SET_PARAMETERS, EMPTY),
    "query-migrate-parameters": (EMPTY, PARAMETERS),
    "migrate-set-capabilities": (obj(req("capabilities", Array(CAPABILITY_STATUS))), EMPTY),
    "query-migrate-capabilities": (EMPTY, Array(CAPABILITY_STATUS)),
    "x-migrate-resolve": (obj(req("decision", Enum(("keep", "discard")))), EMPTY),
}
EVENTS: dict[str, Obj] = {
    "MIGRATION": obj(req("status", MIGRATION_STATUS), opt("x-in-doubt", "str")),
    "MIGRATION_PASS": obj(req("pass", "int")),
    "STOP": EMPTY,
    "RESUME": EMPTY,
    "SHUTDOWN": obj(req("guest", "bool"),
                    req("reason", Enum(("host-qmp-quit", "host-signal")))),
}
assert set(IN_PROGRESS) <= set(MIGRATION_STATUS.values)


# -- SchemaInfo, in QEMU's form ----------------------------------------------------------
@dataclass
class _Namer:
    """Opaque names for types, in the order first referenced; each type listed once."""

    out: list[dict[str, Any]] = field(default_factory=list)
    names: dict[Type, str] = field(default_factory=dict)
    count: int = 0

    def name(self, t: Type) -> str:
        if t in self.names:
            return self.names[t]
        if isinstance(t, str):
            assert t in BUILTINS, t
            self.names[t] = t
            self.out.append({"name": t, "json-type": BUILTINS[t], "meta-type": "builtin"})
            return t
        if isinstance(t, Array):
            elem = self.name(t.element)
            n = f"[{elem}]"
            self.names[t] = n
            self.out.append({"name": n, "element-type": elem, "meta-type": "array"})
            return n
        n = str(self.count)
        self.count += 1
        self.names[t] = n
        info: dict[str, Any] = {"name": n}
        self.out.append(info)  # listed before its parts, as QEMU lists them
        if isinstance(t, Enum):
            marked = dict(t.features)
            info["members"] = [{"name": v, "features": list(marked[v])} if v in marked
                               else _features({"name": v}, v) for v in t.values]
            info["meta-type"] = "enum"
            info["values"] = list(t.values)
        elif isinstance(t, Alternate):
            info["members"] = [{"type": self.name(c)} for c in t.choices]
            info["meta-type"] = "alternate"
        else:
            members = []
            for m in t.members:
                d: dict[str, Any] = {"name": m.name}
                if m.optional:
                    d["default"] = None
                d["type"] = self.name(m.type)
                members.append(_features(d, m.name))
            info["members"] = members
            if t.tag is not None:
                info["tag"] = t.tag
                info["variants"] = [{"case": c, "type": self.name(v)} for c, v in t.variants]
            info["meta-type"] = "object"
        return n


def _features(d: dict[str, Any], name: str) -> dict[str, Any]:
    if name.startswith("x-"):
        d["features"] = ["unstable"]  # QEMU's mark for what may change
    return d


def schema() -> list[dict[str, Any]]:
    """The SchemaInfo list query-qmp-schema returns."""
    namer = _Namer()
    namer.name(EMPTY)  # "0", as in QEMU
    entries: list[dict[str, Any]] = []
    for cmd, (arg, ret) in COMMANDS.items():
        entries.append(_features({"name": cmd, "ret-type": namer.name(ret),
                                  "meta-type": "command", "arg-type": namer.name(arg)}, cmd))
    for ev, data in EVENTS.items():
        entries.append({"name": ev, "meta-type": "event", "arg-type": namer.name(data)})
    return entries + namer.out


# -- checking a value against a SchemaInfo list ----------------------------------------
def validate(entries: list[dict[str, Any]], type_name: str, value: Any,
             path: str = "value") -> list[str]:
    """What is wrong with ``value`` as type ``type_name`` of ``entries`` (none: [])."""
    by = {e["name"]: e for e in entries}
    return _check(by, type_name, value, path)


def _check(by: dict[str, dict[str, Any]], name: str, v: Any, path: str) -> list[str]:
    t = by.get(name)
    if t is None:
        return [f"{path}: type {name!r} is not in the schema"]
    meta = t["meta-type"]
    if meta == "builtin":
        ok = {"string": isinstance(v, str), "boolean": isinstance(v, bool),
              "int": isinstance(v, int) and not isinstance(v, bool),
              "number": isinstance(v, int | float) and not isinstance(v, bool),
              "null": v is None, "object": isinstance(v, dict),
              "array": isinstance(v, list), "value": True}[t["json-type"]]
        return [] if ok else [f"{path}: {v!r} is not {t['json-type']}"]
    if meta == "enum":
        names = [m["name"] for m in t["members"]]
        return [] if v in names else [f"{path}: {v!r} is not one of {names}"]
    if meta == "array":
        if not isinstance(v, list):
            return [f"{path}: {v!r} is not an array"]
        return [e for i, x in enumerate(v) for e in _check(by, t["element-type"], x,
                                                           f"{path}[{i}]")]
    if meta == "alternate":
        for m in t["members"]:
            if not _check(by, m["type"], v, path):
                return []
        return [f"{path}: {v!r} fits none of the alternate's types"]
    if meta != "object":
        return [f"{path}: {name!r} is a {meta}, not a type"]
    if not isinstance(v, dict):
        return [f"{path}: {v!r} is not an object"]
    members = list(t["members"])
    if "tag" in t and t["tag"] in v:
        for var in t.get("variants", []):
            if var["case"] == v[t["tag"]]:
                members += by[var["type"]]["members"]
    errors = []
    known = {m["name"] for m in members}
    for m in members:
        if m["name"] in v:
            errors += _check(by, m["type"], v[m["name"]], f"{path}.{m['name']}")
        elif "default" not in m:
            errors.append(f"{path}: the required member {m['name']!r} is missing")
    errors += [f"{path}: {k!r} is not in the schema" for k in v if k not in known]
    return errors
