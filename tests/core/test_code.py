"""Agent modules imported anew on reload (otpd.agent.code), in this process: no daemon needed."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from otpd.agent import code

pytestmark = pytest.mark.timeout(30)

BASE = "from otpd.agent.base import Agent\n\n\nclass Base(Agent):\n    word = {word!r}\n"
CHILD = "import {base}\nfrom {base} import Base\n\n\nclass Child(Base):\n    tag = {tag!r}\n\n\nSHARED = {base}.Base\n"


@pytest.fixture
def modules(tmp_path: Path) -> Iterator[Path]:
    sys.path.insert(0, str(tmp_path))
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        for name in [n for n in sys.modules if n.startswith("rc_")]:
            del sys.modules[name]
            code._seen.pop(name, None)  # what the daemon remembered of their files


def write(path: Path, text: str) -> None:
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    os.utime(path, ns=(before + 10**9, before + 10**9))  # a later edit, whatever the clock's grain


def base_and_child(modules: Path) -> tuple[object, object]:
    """rc_z_base's Base and rc_a_child's Child(Base), imported and noted as the daemon does."""
    write(modules / "rc_z_base.py", BASE.format(word="one"))
    write(modules / "rc_a_child.py", CHILD.format(base="rc_z_base", tag="one"))
    import rc_a_child  # type: ignore[import-not-found]
    import rc_z_base  # type: ignore[import-not-found]

    code.note("rc_a_child")
    code.note("rc_z_base")
    return rc_a_child, rc_z_base


def test_both_changed_and_the_subclass_first_by_name_it_still_gets_the_new_base(modules: Path) -> None:
    rc_a_child, _ = base_and_child(modules)
    write(modules / "rc_z_base.py", BASE.format(word="two"))
    write(modules / "rc_a_child.py", CHILD.format(base="rc_z_base", tag="two"))
    checked: list[list[str]] = []
    names = code.reimport(code.changed(["rc_a_child:Child", "rc_z_base:Base"]), checked.append)
    assert names == ["rc_a_child", "rc_z_base"] and checked == [names]
    child, base = sys.modules["rc_a_child"], sys.modules["rc_z_base"]
    assert child is not rc_a_child and child.Child.tag == "two"
    assert child.Child.__bases__ == (base.Base,) and child.Child.word == "two"
    assert child.SHARED is base.Base and child.rc_z_base is base


def test_a_failed_check_puts_every_old_module_back(modules: Path) -> None:
    rc_a_child, rc_z_base = base_and_child(modules)
    write(modules / "rc_z_base.py", BASE.format(word="two"))

    def refuse(names: list[str]) -> None:
        raise code.ReimportFailed(f"refused {names}")

    with pytest.raises(code.ReimportFailed, match=r"refused \['rc_a_child', 'rc_z_base'\]"):
        code.reimport(code.changed(["rc_z_base:Base"]), refuse, ["rc_a_child", "rc_z_base"])
    assert sys.modules["rc_a_child"] is rc_a_child and sys.modules["rc_z_base"] is rc_z_base
    assert code.changed(["rc_z_base:Base"]) == ["rc_z_base"]  # still changed: tried again next reload


def test_a_holder_runs_once_more_however_its_values_are_named(modules: Path) -> None:
    """A lambda, or a class kept under another name, is told old or new by identity: the
    module that holds it is imported again once, not once per module of the pool."""
    write(modules / "rc_z_base.py", "double = lambda x: 2 * x  # noqa: E731\nclass Real:\n    pass\nAlias = Real\n")
    write(modules / "rc_a_holder.py", "import rc_z_base\nfrom rc_z_base import Alias, double\n"
                                      "RUNS = rc_z_base.__dict__.setdefault('runs', [])\nRUNS.append(1)\n")
    for i in range(4):  # a pool of bystanders
        write(modules / f"rc_m{i}.py", "X = 1\n")
    import rc_a_holder  # type: ignore[import-not-found]  # noqa: F401

    names = ["rc_a_holder", "rc_z_base"] + [f"rc_m{i}" for i in range(4)]
    for i in range(4):
        __import__(f"rc_m{i}")
    for name in names:
        code.note(name)
    write(modules / "rc_z_base.py", "double = lambda x: 3 * x  # noqa: E731\nclass Real:\n    pass\nAlias = Real\n")
    done = code.reimport(code.changed(["rc_z_base:Real"]), lambda names: None, names)
    holder, base = sys.modules["rc_a_holder"], sys.modules["rc_z_base"]
    assert done == ["rc_a_holder", "rc_z_base"]
    assert holder.double is base.double and holder.double(1) == 3 and holder.Alias is base.Real
    assert holder.RUNS == [1], "its body ran once, in the new base's namespace"


def test_new_code_that_calls_sys_exit_is_refused_and_the_old_modules_stay(modules: Path) -> None:
    write(modules / "rc_z_base.py", BASE.format(word="one"))
    import rc_z_base  # type: ignore[import-not-found]

    code.note("rc_z_base")
    write(modules / "rc_z_base.py", "import sys\nsys.exit(3)\n")
    with pytest.raises(code.ReimportFailed, match="SystemExit"):
        code.reimport(code.changed(["rc_z_base:Base"]), lambda names: None)
    assert sys.modules["rc_z_base"] is rc_z_base


def test_what_a_module_took_from_a_version_of_an_earlier_round_is_seen_as_old(modules: Path) -> None:
    """Only rc_base changes.  rc_b goes in round 2 before rc_c, which it takes ``helper`` from,
    so it goes again in round 3, after rc_a_d (first by name), which takes round 2's ``B``:
    neither the version before the reload nor the current one, and still old."""
    write(modules / "rc_base.py", "class Base:\n    V = 1\n")
    write(modules / "rc_c.py", "from rc_base import Base\n\n\ndef helper():\n    return Base.V\n")
    write(modules / "rc_b.py", "from rc_base import Base\nfrom rc_c import helper\n\n\n"
                               "class B(Base):\n    def h(self):\n        return helper()\n")
    write(modules / "rc_a_d.py", "from rc_b import B\n\n\nclass D(B):\n    pass\n")
    import rc_a_d  # type: ignore[import-not-found]  # noqa: F401

    for name in ("rc_base", "rc_b", "rc_c", "rc_a_d"):
        code.note(name)
    write(modules / "rc_base.py", "class Base:\n    V = 2\n")
    code.reimport(code.changed(["rc_base:Base"]), lambda names: None, ["rc_b", "rc_c", "rc_a_d"])
    d, b = sys.modules["rc_a_d"], sys.modules["rc_b"]
    assert d.D.__mro__[1] is b.B and d.D().h() == 2
