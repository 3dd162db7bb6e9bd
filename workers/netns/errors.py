"""The one error the netns building blocks raise: what failed, and how to fix it."""

from __future__ import annotations


class NetnsSetupError(RuntimeError):
    """The sandbox network could not be set up or verified: the session must not start.

    ``what`` says what failed (for the audit stream and the user), ``how_to_fix`` what
    the user can do about it. Both are plain sentences.
    """

    def __init__(self, what: str, how_to_fix: str) -> None:
        super().__init__(f"{what} -- {how_to_fix}")
        self.what = what
        self.how_to_fix = how_to_fix

    @property
    def fix(self) -> str:
        """Alias of ``how_to_fix``."""
        return self.how_to_fix

    def to_json(self) -> dict[str, str]:
        return {"what": self.what, "how_to_fix": self.how_to_fix}
