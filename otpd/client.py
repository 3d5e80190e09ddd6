"""The public client API: ``from otpd.client import Client``."""

from otpd.control.client import Client, Unreachable, default_socket

__all__ = ["Client", "Unreachable", "default_socket"]
