"""Which transformers releases yuan-hf supports, and the one warning for a release it has not been tested with.

Policy (README "Supported versions"): the floor is the oldest release CI runs the full suite on; every minor up to
the newest tested one passes the compatibility subset; the newest passes the full suite. A newer release is
allowed by `pyproject.toml` (transformers' deprecation cycle keeps old names working for several minors, and a cap
would block users from fixes), but `import yuan_hf` warns once and points to `yuan-hf doctor`, which checks the
installed environment in seconds.
"""

import logging

from packaging.version import Version

TRANSFORMERS_FLOOR = "5.17"
TRANSFORMERS_NEWEST_TESTED = "5.25"

logger = logging.getLogger("yuan_hf")


def minor(version: str) -> tuple[int, int]:
    parsed = Version(version)
    return parsed.major, parsed.minor


def transformers_support(version: str) -> str | None:
    """None when `version` is in the tested range, else one sentence saying what it is and what to do."""
    tested = f"{TRANSFORMERS_FLOOR} to {TRANSFORMERS_NEWEST_TESTED}"
    if minor(version) < minor(TRANSFORMERS_FLOOR):
        return (
            f"transformers {version} is older than yuan-hf supports (tested: {tested}); "
            f"install a tested release: pip install 'transformers>={TRANSFORMERS_FLOOR},<{_next(TRANSFORMERS_NEWEST_TESTED)}'"
        )
    if minor(version) > minor(TRANSFORMERS_NEWEST_TESTED):
        return (
            f"transformers {version} is newer than the newest release yuan-hf was tested with "
            f"({TRANSFORMERS_NEWEST_TESTED}; tested: {tested}); run `yuan-hf doctor` to check this environment, or "
            f"pip install 'transformers>={TRANSFORMERS_FLOOR},<{_next(TRANSFORMERS_NEWEST_TESTED)}'"
        )
    return None


def _next(version: str) -> str:
    major, minor_ = minor(version)
    return f"{major}.{minor_ + 1}"


def warn_if_untested(version: str | None = None) -> None:
    """One warning at import when the installed transformers (or `version`) is outside the tested range."""
    if version is None:
        import transformers

        version = transformers.__version__
    message = transformers_support(version)
    if message:
        logger.warning(message)
