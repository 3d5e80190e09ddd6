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


def test_both_changed_and_the_subclass_first_by_name_it_still_gets_the_new_base(modules: Path) -> None:
    write(modules / "rc_z_base.py", BASE.format(word="one"))
    write(modules / "rc_a_child.py", CHILD.format(base="rc_z_base", tag="one"))
    import rc_a_child  # type: ignore[import-not-found]

    code.note("rc_a_child")
    code.note("rc_z_base")
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
    write(modules / "rc_z_base.py", BASE.format(word="one"))
    write(modules / "rc_a_child.py", CHILD.format(base="rc_z_base", tag="one"))
    import rc_a_child  # type: ignore[import-not-found]
    import rc_z_base  # type: ignore[import-not-found]

    code.note("rc_a_child")
    code.note("rc_z_base")
    write(modules / "rc_z_base.py", BASE.format(word="two"))

    def refuse(names: list[str]) -> None:
        raise code.ReimportFailed(f"refused {names}")

    with pytest.raises(code.ReimportFailed, match=r"refused \['rc_a_child', 'rc_z_base'\]"):
        code.reimport(code.changed(["rc_z_base:Base"]), refuse, ["rc_a_child", "rc_z_base"])
    assert sys.modules["rc_a_child"] is rc_a_child and sys.modules["rc_z_base"] is rc_z_base
    assert code.changed(["rc_z_base:Base"]) == ["rc_z_base"]  # still changed: tried again next reload
