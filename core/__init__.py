"""Code shared by the supervisor and every worker: the channel protocol, the
session policy model, event construction and Linux process primitives."""

__version__ = "0.1.0"
