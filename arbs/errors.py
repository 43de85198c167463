"""The arbs exception hierarchy. Every failure a user can cause is one of these."""


class ArbsError(Exception):
    """Base class of every error arbs raises on bad input or bad state."""


class ConfigError(ArbsError, ValueError):
    """An option, format name, rule or parameter is not valid."""


class StoreNotFoundError(ArbsError, FileNotFoundError):
    """A checkpoint or run directory does not exist or holds no committed checkpoint."""


class CorruptStoreError(ArbsError, ValueError):
    """A checkpoint on disk does not match the format: missing, damaged or altered data."""


class FormatVersionError(ArbsError, ValueError):
    """A checkpoint was written with a format version this arbs does not know."""


class NonFiniteError(ArbsError, ValueError):
    """A gradient, loss or float weight holds NaN or inf."""


class IntegerRangeError(ArbsError, OverflowError):
    """An integer state value would leave its representable or allowed range."""


class RunLockedError(ArbsError):
    """Another process holds the writer lock of a run directory (one writer per run directory).

    ``run_dir`` is the run directory; ``holder`` what the holder recorded (``host``, ``pid``, ``since``,
    ``argv0``), or None when that record cannot be read.
    """

    def __init__(self, message: str, run_dir=None, holder: dict | None = None):
        super().__init__(message)
        self.run_dir = run_dir
        self.holder = holder

    def __reduce__(self):
        return type(self), (str(self), self.run_dir, self.holder)
