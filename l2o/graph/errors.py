"""Errors raised by the graph builder."""


class UnsupportedModuleError(TypeError):
    """A parameter could not be given graph structure and ``strict=True``.

    The message names every offending module by qualified name and class, and
    the parameters it owns, so the user knows what to map or replace.
    """
