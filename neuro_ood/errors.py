"""Exceptions that the CLI turns into one clear error line and a non-zero exit."""


class NeuroOODError(Exception):
    """Base class for errors a user can act on (bad input, bad config, bad run directory)."""


class ScanError(NeuroOODError):
    """A scan file cannot be used: missing, corrupt, truncated, wrong dimensionality, no signal."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = " ".join(str(reason).split())  # one line, whatever the library said
        super().__init__(f"{self.path}: {self.reason}")


class ConfigError(NeuroOODError):
    """A configuration file or override is invalid."""


class RunError(NeuroOODError):
    """A run directory is missing pieces or was made with other preprocessing."""


class CohortError(NeuroOODError):
    """A cohort (BIDS tree or table of scans) cannot be read or has no usable scans."""
