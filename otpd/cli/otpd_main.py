"""``otpd``: run the daemon in the foreground, or check a config.

Exit statuses of ``otpd run``: 0 stopped cleanly; 1 could not start (another
daemon on the socket, a directory that cannot be made); 2 bad config or usage;
4 the root supervisor exceeded its restart intensity (systemd's
Restart=on-failure is the next level); 70 internal error.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from otpd.config import ConfigError, load
from otpd.errors import OtpdError

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "config" / "otpd.toml"
EXIT_CANNOT_START = 1
EXIT_BAD_CONFIG = 2


def _load_or_exit(path: Path):  # type: ignore[no-untyped-def]
    try:
        return load(path)
    except ConfigError as err:
        for line in err.errors:
            click.echo(f"otpd: {line}", err=True)
        sys.exit(EXIT_BAD_CONFIG)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="otpd")
def main() -> None:
    """otpd: OTP-style supervision of OS processes with persistent agent state."""


@main.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=DEFAULT_CONFIG,
              show_default=True, help="TOML config file.")
def run(config_path: Path) -> None:
    """Run the daemon in the foreground until stopped."""
    config = _load_or_exit(config_path)
    import faulthandler

    from otpd.posix.daemon import Daemon

    faulthandler.enable()  # a watchdog's SIGABRT leaves the stuck loop's traceback in the journal
    try:
        daemon = Daemon(config)
        status = daemon.run()
    except OtpdError as err:
        click.echo(f"otpd: cannot start: {err}", err=True)
        sys.exit(EXIT_CANNOT_START)
    except OSError as err:
        click.echo(f"otpd: cannot start: {err}", err=True)
        sys.exit(EXIT_CANNOT_START)
    sys.exit(status)


@main.command("check-config")
@click.argument("config_path", type=click.Path(path_type=Path))
def check_config(config_path: Path) -> None:
    """Validate a config file; print every error with its key and line."""
    config = _load_or_exit(config_path)
    from otpd.core.spec import walk

    nodes = walk(config.root)
    click.echo(f"{config_path}: ok ({len(nodes) - 1} children; socket {config.daemon.socket})")


if __name__ == "__main__":
    main()
