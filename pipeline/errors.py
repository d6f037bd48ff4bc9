"""Exception types a user can act on. Stages turn them into one message and exit code 2."""


class LadderCacheError(Exception):
    """Base class: the message names the field, file or value and what to do."""


class ConfigError(LadderCacheError):
    """A config field has a bad value."""


class DataError(LadderCacheError):
    """Input data is missing a column, has empty text, bad labels, ..."""


class StoreError(LadderCacheError):
    """A ladder store is missing, incomplete, corrupt or made for another config."""


class FingerprintMismatch(StoreError):
    """A store (or side init) was made for a different config."""

    def __init__(self, what: str, diffs: dict):
        self.diffs = diffs
        lines = [f"  {k}: stored={v[0]!r} wanted={v[1]!r}" for k, v in sorted(diffs.items())]
        super().__init__(
            f"{what} was made for a different config; differing fields: {', '.join(sorted(diffs))}\n"
            + "\n".join(lines)
            + "\nRe-run the stage that makes it with this config, or point to the matching one."
        )


class BackboneError(LadderCacheError):
    """The backbone cannot be loaded or is unsupported."""


class OutputError(LadderCacheError):
    """An output cannot be written (read-only folder, full disk, file-size limit) or is in use."""
