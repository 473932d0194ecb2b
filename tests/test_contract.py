"""The contract suite over every registered compressor, first- and third-party alike."""

import pytest

from tokenbench.plugins import load_registry
from tokenbench.testing import check_compressor

REGISTRY = load_registry()


@pytest.mark.parametrize("name", sorted(REGISTRY.compressors))
def test_registered_compressor_honours_the_contract(name):
    check_compressor(REGISTRY.compressors[name])
