"""One error hierarchy for everything kdstore reports to a user.

Every message is a single line that names the file, row, UID or key and says what was
expected and what was found, so a CLI can print it as is.
"""


class KDStoreError(Exception):
    """Base class of all errors kdstore raises on bad input."""


class AnnotationError(KDStoreError):
    """An annotation file (CSV, class list) is malformed or inconsistent."""


class StoreFormatError(KDStoreError):
    """A path is not a kdstore store, or a store's layout disagrees with the schema."""


class MissingError(KDStoreError, KeyError):
    """A UID, group or array that was asked for does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DataError(KDStoreError):
    """Array content is unusable: NaN/inf, wrong dimension, wrong class count."""


class ConfigError(KDStoreError):
    """Options or checkpoints that do not fit together."""


class DependencyError(KDStoreError):
    """An optional dependency needed for the requested path is not installed."""


class AccessError(KDStoreError):
    """A store cannot be written now: read-only, or held by another writer."""
