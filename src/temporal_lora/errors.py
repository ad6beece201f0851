"""Named errors a user can cause. The CLI prints their message as one line and exits non-zero."""


class TemporalLoRAError(Exception):
    """Base class for every error caused by user input or state on disk."""


class CorpusError(TemporalLoRAError):
    """Unknown built-in domain, missing/empty corpus path, unreadable corpus file."""


class FetchError(TemporalLoRAError):
    """A package could not be downloaded into the cache."""


class BundleError(TemporalLoRAError):
    """A bundle is missing files, corrupt, or of an unknown format version."""


class BaseModelMismatchError(BundleError):
    """A bundle was written for a different base model than the one it is loaded on."""


class InputError(TemporalLoRAError):
    """Empty prompt, prompt longer than the context, unknown domain or mode."""
