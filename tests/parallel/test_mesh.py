"""Mesh shapes from a config: the -1 size and the errors that name what does not fit."""

import pytest

from jaxasr.parallel.mesh import mesh_sizes


def test_minus_one_takes_the_remaining_devices():
    assert mesh_sizes({"data": -1, "fsdp": 2, "tensor": 1}, 8) == [4, 2, 1]
    assert mesh_sizes((1, -1, 2), 8) == [1, 4, 2]
    assert mesh_sizes({"data": 2, "fsdp": 2, "tensor": 2}, 8) == [2, 2, 2]


@pytest.mark.parametrize("shape, match", [
    ({"data": -1, "fsdp": -1, "tensor": 1}, "at most one size may be -1"),
    ({"data": -1, "fsdp": 3, "tensor": 1}, "does not divide 8 devices"),
    ({"data": 2, "fsdp": 2, "tensor": 1}, "needs 4 devices, there are 8"),
    ((2, 4), "must give sizes for"),
])
def test_shapes_that_do_not_fit_say_why(shape, match):
    with pytest.raises(ValueError, match=match):
        mesh_sizes(shape, 8)
