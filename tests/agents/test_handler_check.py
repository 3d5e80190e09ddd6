"""``check_handler``, what a TaskAgent's ``check_args`` runs in the daemon: found, never run."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from otpd.agents import check_handler
from otpd.errors import OtpdError


@pytest.fixture
def code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    pkg = tmp_path / "hcpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('a package __init__ ran in the daemon')\n")
    (pkg / "h.py").write_text("def run(payload):\n    return payload\n")
    (tmp_path / "hcdyn.py").write_text("import sys\n\nsys.modules[__name__].run = len\n")
    (tmp_path / "hcexec.py").write_text("exec('def run(p): return p')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("hcpkg", "hcpkg.h", "hcdyn", "hcexec"):
        sys.modules.pop(name, None)


def test_a_handler_is_found_without_running_it_or_its_packages(code: Path) -> None:
    check_handler("hcpkg.h:run")
    assert "hcpkg" not in sys.modules and "hcpkg.h" not in sys.modules


@pytest.mark.parametrize(("ref", "message"), [
    ("hcpkg.h:nope", "'hcpkg.h' defines no 'nope'"),
    ("hcpkg.nosuch:run", "no module 'hcpkg.nosuch'"),
    ("hcpkg.h.deeper:run", "no module 'hcpkg.h.deeper'"),
    ("nosuch_top_module_xyz:run", "no module 'nosuch_top_module_xyz'"),
    ("hcpkg.h", 'handler must be "module:function"'),
])
def test_a_missing_handler_is_config_invalid(code: Path, ref: str, message: str) -> None:
    with pytest.raises(OtpdError) as err:
        check_handler(ref)
    assert err.value.code == "config_invalid" and message in err.value.message
    assert "hcpkg" not in sys.modules


@pytest.mark.parametrize("ref", ["hcdyn:run", "hcexec:run", "os.path:join", "os:system", "json.decoder:JSONDecoder"])
def test_names_bound_at_run_time_or_by_imported_modules_are_not_refused(code: Path, ref: str) -> None:
    check_handler(ref)  # the source cannot tell: the agent's own import decides
