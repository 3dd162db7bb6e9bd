"""core/record.py does what dataclasses does for the classes agentpen declares with it:
each behaviour is checked against a real dataclass declared the same way."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from agentpen.core import record as rec


def _pair(frozen: bool):
    @rec.record(frozen=frozen)
    class R:
        """doc"""

        name: str
        port: int = 443
        tags: list[str] = rec.field(default_factory=list)

    @dataclasses.dataclass(frozen=frozen)
    class D:
        """doc"""

        name: str
        port: int = 443
        tags: list[str] = dataclasses.field(default_factory=list)

    return R, D


@pytest.mark.parametrize("frozen", [False, True])
def test_construction_repr_eq_and_defaults_match_dataclasses(frozen):
    R, D = _pair(frozen)
    for args, kwargs in (((("a",)), {}), (("a", 1), {}), (("a",), {"tags": ["x"]}),
                         ((), {"name": "a", "port": 2, "tags": []})):
        r, d = R(*args, **kwargs), D(*args, **kwargs)
        assert rec.asdict(r) == dataclasses.asdict(d)
        assert repr(r).replace("R(", "D(", 1).split("(", 1)[1] == repr(d).split("(", 1)[1]
    assert R("a") == R("a") and R("a") != R("b") and R("a") != D("a")
    assert R("a").tags is not R("a").tags  # a fresh list each time
    assert "tags" not in vars(R)  # the factory is not left on the class
    assert rec.fields(R) == tuple(f.name for f in dataclasses.fields(D)) == ("name", "port", "tags")


@pytest.mark.parametrize("frozen", [False, True])
def test_bad_arguments_raise_type_error_like_dataclasses(frozen):
    R, D = _pair(frozen)
    for cls in (R, D):
        for args, kwargs in (((), {}), (("a", 1, [], 4), {}), (("a",), {"name": "b"}),
                             (("a",), {"nope": 1})):
            with pytest.raises(TypeError):
                cls(*args, **kwargs)


def test_frozen_refuses_assignment_and_hashes_by_value():
    R, D = _pair(True)
    r = R("a", tags=())
    for obj in (r, D("a", tags=())):
        with pytest.raises(AttributeError):
            obj.port = 1
        with pytest.raises(AttributeError):
            del obj.port
    with pytest.raises(rec.FrozenInstanceError):
        r.name = "b"
    assert hash(R("a", tags=())) == hash(R("a", tags=())) and {R("a", tags=()), R("a", tags=())} == {r}


def test_mutable_records_are_unhashable_like_dataclasses():
    R, D = _pair(False)
    for obj in (R("a"), D("a")):
        with pytest.raises(TypeError):
            hash(obj)
    r = R("a")
    r.port = 1  # the control: mutable
    assert r.port == 1


def test_asdict_recurses_and_copies_and_replace_makes_a_new_one():
    @rec.record(frozen=True)
    class Inner:
        x: int

    @rec.record(frozen=True)
    class Outer:
        inner: Inner
        items: list = rec.field(default_factory=list)
        table: dict = rec.field(default_factory=dict)
        pair: tuple = ()

    o = Outer(Inner(1), [Inner(2)], {"k": [Inner(3)]}, (Inner(4),))
    d = rec.asdict(o)
    assert d == {"inner": {"x": 1}, "items": [{"x": 2}], "table": {"k": [{"x": 3}]}, "pair": ({"x": 4},)}
    d["items"].append(0)
    assert len(o.items) == 1  # a copy
    o2 = rec.replace(o, pair=())
    assert o2.pair == () and o.pair == (Inner(4),) and o2.inner is o.inner
    with pytest.raises(TypeError):
        rec.replace(o, nope=1)
    with pytest.raises(TypeError):
        rec.asdict(Outer)


def test_what_records_refuse():
    with pytest.raises(TypeError, match="mutable default"):
        @rec.record
        class Bad:
            items: list = []

    with pytest.raises(TypeError, match="without a default"):
        @rec.record
        class Order:
            a: int = 1
            b: int

    @rec.record
    class Base:
        a: int

    with pytest.raises(TypeError, match="inherit"):
        @rec.record
        class Child(Base):
            b: int


def test_an_own_init_or_repr_is_kept():
    @rec.record(frozen=True)
    class Own:
        a: int

        def __init__(self, a: int) -> None:
            self.__dict__["a"] = a * 2

        def __repr__(self) -> str:
            return "own"

    assert Own(2).a == 4 and repr(Own(1)) == "own" and Own(1) == Own(1)


def test_the_module_imports_nothing_heavy():
    code = ("import sys; import agentpen.core.record; "
            "print(sorted({'dataclasses', 'typing', 'inspect'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out
