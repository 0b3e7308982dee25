"""One exception base, so the CLI can print a single clear line for anything the user can fix."""


class GptxError(Exception):
    """An error the user caused or can fix (bad path, bad option, missing dependency)."""
