from hydra.errors import CompactHydraException


class UserError(CompactHydraException):
    """Something the user can fix: Hydra prints it as one line, without a traceback
    (unless HYDRA_FULL_ERROR=1)."""


class Diverged(RuntimeError):
    """The loss became NaN or infinite: the run is stopped and marked failed."""


class Locked(UserError):
    """Another process is running this very job right now."""
