"""User-facing errors. Each carries one line that names the file, the tensor and the broken constraint."""


class XFPError(Exception):
    """A user mistake or a bad input: the CLI prints the message on one line and exits non-zero."""


class FormatError(XFPError):
    """A file that is not a valid XFP/safetensors/GGUF file, or violates docs/FORMAT.md."""

    def __init__(self, path: object, tensor: str | None, constraint: str):
        self.path, self.tensor, self.constraint = str(path), tensor, constraint
        where = f"{self.path}: tensor '{tensor}'" if tensor else self.path
        super().__init__(f"{where}: {constraint}")


class SourceError(XFPError):
    """A source checkpoint that cannot be read (missing config, unsupported dtype, unknown architecture...)."""
