"""The storage-format registry: every format is reachable from CacheConfig, names are checked in one place."""

import pytest

from kvstream.kvcache.config import QUANTS, CacheConfig
from kvstream.kvcache.formats import FORMATS, StorageFormat, get_format, register


def test_registry_is_what_the_config_accepts():
    assert QUANTS == tuple(FORMATS) == ("none", "fp8", "kivi2", "kivi4", "token2")
    for name, fmt in FORMATS.items():
        cfg = CacheConfig(quant=name, group_size=16, residual=32)
        assert cfg.format is fmt and cfg.bits == fmt.bits
        assert fmt.layout in ("none", "fp8", "channel", "token")
        assert fmt.grouped == (fmt.layout in ("channel", "token"))
        assert fmt.quantized == (fmt.layout != "none") == (fmt.bits is not None)
        if fmt.bits:
            assert fmt.codes_per_word() * fmt.bits == 32


@pytest.mark.parametrize("quant, policy, kivi", [("kivi2", "full", True), ("kivi4", "full", True),
                                                 ("kivi2", "h2o", False), ("token2", "full", False),
                                                 ("none", "full", False), ("fp8", "full", False),
                                                 ("fp8", "keyformer", False)])
def test_kivi_residual_mode(quant, policy, kivi):
    assert CacheConfig(quant=quant, policy=policy, budget=0.5).kivi_residual is kivi


def test_unknown_format_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"int3.*none, fp8, kivi2, kivi4, token2"):
        get_format("int3")
    with pytest.raises(ValueError, match=r"CacheConfig.quant='int3' is not one of none, fp8, kivi2, kivi4, token2"):
        CacheConfig(quant="int3")
    with pytest.raises(ValueError, match="already registered"):
        register(StorageFormat("kivi2", "channel", 2, True, "again"))
