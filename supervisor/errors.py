"""agentpen's own failures and the exit statuses they map to.

The statuses follow `env`, `timeout` and container runtimes: 125 for agentpen's own
failure, 126 for a command that cannot be executed, 127 for one that is not found.
"""

from __future__ import annotations

EXIT_AGENTPEN = 125
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127


class AgentpenError(Exception):
    """A failure agentpen reports in one line, with how to fix it when known."""

    exit_status = EXIT_AGENTPEN

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return self.message if not self.fix else f"{self.message} (fix: {self.fix})"


class UsageError(AgentpenError):
    """Bad input on the command line or in the config file."""


class LayerUnavailable(AgentpenError):
    """A confinement layer cannot be enforced on this host: refuse to run."""


class SetupFailed(AgentpenError):
    """A worker could not build its part of the sandbox."""


class CommandNotFound(AgentpenError):
    exit_status = EXIT_NOT_FOUND


class CommandNotExecutable(AgentpenError):
    exit_status = EXIT_NOT_EXECUTABLE
