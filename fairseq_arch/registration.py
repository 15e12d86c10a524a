"""Register a fairseq task or criterion once: ``pip install -e .`` plus ``--user-dir``
may import the plugin's modules twice under different names, and fairseq raises on a
second registration of a name."""


def register_once(registry, register, name: str, dataclass):
    """``register(name, dataclass=dataclass)`` unless ``name`` is in ``registry`` already."""
    if name in registry:
        return lambda cls: cls
    return register(name, dataclass=dataclass)
