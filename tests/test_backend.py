"""The backends are real subclasses of one abstract base: a backend that leaves out an
operation the store needs cannot be made."""

from __future__ import annotations

import pytest

from kdstore.backend import Backend
from kdstore.hdf5_backend import HDF5Backend
from kdstore.zarr_backend import ZarrBackend


def _without(cls: type, method: str) -> type:
    """A subclass of ``cls``'s base with every method of ``cls`` except ``method``."""
    body = {k: v for k, v in vars(cls).items() if k != method and not k.startswith("__")}
    return type(f"{cls.__name__}Without_{method}", (Backend,), body)


@pytest.mark.parametrize("cls", [ZarrBackend, HDF5Backend])
def test_both_backends_implement_every_abstract_method(cls, tmp_path):
    assert issubclass(cls, Backend) and not cls.__abstractmethods__
    cls(tmp_path / "s")  # instantiable


@pytest.mark.parametrize("method", sorted(Backend.__abstractmethods__))
def test_a_backend_missing_an_abstract_method_cannot_be_instantiated(method, tmp_path):
    incomplete = _without(ZarrBackend, method)
    with pytest.raises(TypeError, match=method):
        incomplete(tmp_path / "s")


def test_the_base_requires_the_group_commit():
    """``write_group`` is abstract: no backend inherits a commit that silently does nothing."""
    assert {"write_group", "delete_group", "memmap", "attrs", "set_attrs", "_commit_leftovers"} <= Backend.__abstractmethods__
