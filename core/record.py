"""``record``: the part of ``dataclasses`` that agentpen's own data classes use, built
without generating and compiling source code.

Why not ``dataclasses`` (issue 10): importing it (it imports ``inspect``, and with it
``ast``, ``dis`` and ``tokenize``) and compiling four to six methods for each class cost
the supervisor and the forked netns worker ~25 ms of CPU on every start, ~19 ms of the
wall time of ``agentpen -- true`` on a two-core machine (measured with the start-up
bench, interleaved A/B). ``record`` builds the same methods from closures: a class costs
microseconds, an instance a few more than a dataclass's.

What it does, as ``@dataclass`` / ``@dataclass(frozen=True)`` would:

* fields are the class's annotations, in order; a class attribute is the default, and
  ``field(default_factory=f)`` calls ``f()`` for each instance;
* ``__init__`` takes them positionally or by name (TypeError for a missing, unknown or
  repeated argument); a class that defines its own ``__init__`` keeps it;
* ``__repr__`` ``Name(a=1, b='x')``; ``__eq__`` on the same class, field by field;
* ``frozen=True``: assignment and deletion raise ``FrozenInstanceError`` (an
  AttributeError), and instances hash by their fields; otherwise unhashable, as
  dataclasses makes a class with ``__eq__``.

``fields()``, ``asdict()`` and ``replace()`` are the dataclasses functions of the same
names. Not supported (agentpen uses none of them): inheritance between records,
``__post_init__``, ``order``, ``slots``, ``kw_only``, ``ClassVar``, per-field options
other than ``default_factory``. Classes of the proxy worker's hot path keep dataclasses.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing's own flag, without importing typing (issue 10)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeVar, dataclass_transform

    T = TypeVar("T")
else:
    def dataclass_transform(**_kwargs):
        return lambda f: f

_MISSING = object()
_FIELDS = "__record_fields__"


class FrozenInstanceError(AttributeError):
    """Assignment to a field of a frozen record."""


class _Factory:
    __slots__ = ("factory",)

    def __init__(self, factory: Callable[[], Any]) -> None:
        self.factory = factory


def field(*, default_factory: Callable[[], Any]) -> Any:
    """A field whose default is ``default_factory()``, called for each instance."""
    return _Factory(default_factory)


@dataclass_transform(field_specifiers=(field,))
def record(cls: type[T] | None = None, /, *, frozen: bool = False) -> Any:
    """Class decorator: ``@record`` or ``@record(frozen=True)``."""
    def wrap(c: type[T]) -> type[T]:
        return _build(c, frozen)

    return wrap if cls is None else wrap(cls)


def _build(cls: type[T], frozen: bool) -> type[T]:
    if any(hasattr(base, _FIELDS) for base in cls.__mro__[1:]):
        raise TypeError(f"{cls.__name__}: records do not inherit from records")
    names: list[str] = []
    defaults: dict[str, Any] = {}  # name -> value, or _Factory
    # The class's own annotations (inspect.get_annotations would import inspect).
    for name in cls.__dict__.get("__annotations__", {}):  # noqa: RUF063
        names.append(name)
        value = cls.__dict__.get(name, _MISSING)
        if value is _MISSING:
            if defaults:
                raise TypeError(f"{cls.__name__}: field {name} without a default follows one with a default")
            continue
        if isinstance(value, (list, dict, set)):  # one object shared by every instance
            raise TypeError(f"{cls.__name__}.{name}: mutable default, use field(default_factory=...)")
        defaults[name] = value
        if isinstance(value, _Factory):
            delattr(cls, name)  # instances get their own value; the class keeps none
    fields_ = tuple(names)
    known = frozenset(fields_)
    count = len(fields_)
    setattr(cls, _FIELDS, fields_)
    qualname = cls.__qualname__

    if "__init__" not in cls.__dict__:
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            if len(args) > count:
                raise TypeError(f"{qualname}() takes {count} arguments but {len(args)} were given")
            values = dict(zip(fields_, args, strict=False))  # fewer args than fields: fine
            for key, value in kwargs.items():
                if key not in known:
                    raise TypeError(f"{qualname}() got an unexpected keyword argument {key!r}")
                if key in values:
                    raise TypeError(f"{qualname}() got multiple values for argument {key!r}")
                values[key] = value
            if len(values) < count:
                for name in fields_:
                    if name not in values:
                        default = defaults.get(name, _MISSING)
                        if default is _MISSING:
                            raise TypeError(f"{qualname}() missing required argument {name!r}")
                        values[name] = default.factory() if isinstance(default, _Factory) else default
            # In field order, as dataclasses would set them; bypasses a frozen __setattr__.
            self.__dict__.update((name, values[name]) for name in fields_)

        __init__.__qualname__ = f"{qualname}.__init__"
        cls.__init__ = __init__  # type: ignore[misc]

    if "__repr__" not in cls.__dict__:
        def __repr__(self: Any) -> str:
            inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in fields_)
            return f"{type(self).__qualname__}({inner})"

        cls.__repr__ = __repr__  # type: ignore[method-assign]

    if "__eq__" not in cls.__dict__:
        def __eq__(self: Any, other: object) -> bool:
            if other.__class__ is not self.__class__:
                return NotImplemented
            return all(getattr(self, n) == getattr(other, n) for n in fields_)

        cls.__eq__ = __eq__  # type: ignore[method-assign]

    if frozen:
        def __setattr__(self: Any, name: str, value: Any) -> None:
            raise FrozenInstanceError(f"cannot assign to field {name!r}")

        def __delattr__(self: Any, name: str) -> None:
            raise FrozenInstanceError(f"cannot delete field {name!r}")

        def __hash__(self: Any) -> int:
            return hash(tuple(getattr(self, n) for n in fields_))

        cls.__setattr__ = __setattr__  # type: ignore[method-assign,assignment]
        cls.__delattr__ = __delattr__  # type: ignore[method-assign,assignment]
        cls.__hash__ = __hash__  # type: ignore[method-assign,assignment]
    elif "__hash__" not in cls.__dict__:
        cls.__hash__ = None  # type: ignore[assignment]  # mutable and compared by value
    return cls


def fields(obj: Any) -> tuple[str, ...]:
    """The field names of a record (class or instance), in order."""
    names = getattr(obj, _FIELDS, None)
    if names is None:
        raise TypeError(f"{obj!r} is not a record")
    return names


def is_record(obj: Any) -> bool:
    return hasattr(type(obj) if not isinstance(obj, type) else obj, _FIELDS)


def asdict(obj: Any) -> dict[str, Any]:
    """A record as a dict, recursively (records, lists, tuples and dicts are copied)."""
    if not is_record(obj) or isinstance(obj, type):
        raise TypeError("asdict() should be called on record instances")
    return _plain(obj)


def _plain(value: Any) -> Any:
    if is_record(value) and not isinstance(value, type):
        return {name: _plain(getattr(value, name)) for name in fields(value)}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        items = [_plain(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    return value


def replace(obj: T, **changes: Any) -> T:
    """A new record like ``obj`` with ``changes`` (unknown names raise TypeError)."""
    values = {name: getattr(obj, name) for name in fields(obj)}
    values.update(changes)
    return type(obj)(**values)
