"""otpd: Erlang/OTP-style supervision of OS processes, with state that survives crashes."""

from otpd.errors import OtpdError

__version__ = "0.1.0"
__all__ = ["OtpdError", "__version__"]
