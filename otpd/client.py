"""The public client API: ``from otpd.client import Client``."""

from otpd.control.client import BadRequest, Client, Link, Unreachable, default_socket

__all__ = ["BadRequest", "Client", "Link", "Unreachable", "default_socket"]
