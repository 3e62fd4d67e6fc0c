import math

import pytest

import parcae
from parcae import ParcaeConfig, count_params, get_preset

# Paper Table 21: exact parameter counts, tied embeddings counted once.
TABLE_21 = {
    "parcae-140m": 144_323_136,
    "parcae-370m": 388_003_328,
    "parcae-770m": 776_655_680,
    "parcae-1.3b": 1_338_591_744,
    "gpt-140m": 143_141_184,
    "gpt-370m": 385_903_104,
    "gpt-770m": 773_375_040,
    "gpt-1.3b": 1_333_868_544,
}


@pytest.mark.parametrize(("name", "expected"), TABLE_21.items())
def test_paper_parameter_counts(name: str, expected: int) -> None:
    assert count_params(get_preset(name)) == expected


def test_paper_presets_recipe() -> None:
    cfg = get_preset("parcae-370m")
    assert (cfg.n_prelude, cfg.n_core, cfg.n_coda, cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_mlp) == (
        4, 4, 4, 1024, 8, 128, 4096,
    )  # fmt: skip
    assert (cfg.vocab_size, cfg.max_seq_len, cfg.mean_recurrence, cfg.backprop_depth) == (32768, 2048, 8, 4)
    assert cfg.depth_sampling == "per-sequence" and cfg.injection == "diagonal" and cfg.prelude_norm
    assert cfg.tie_embeddings and cfg.mlp == "relu2" and cfg.qk_norm and cfg.rope_base == 50_000
    assert cfg.value_embeddings and cfg.state_init == "like-init"
    gpt = get_preset("gpt-1.3b")
    assert gpt.n_layers == 24 and not gpt.is_looped


def test_tiny_presets_are_parameter_matched() -> None:
    looped, fixed = count_params(get_preset("parcae-tiny")), count_params(get_preset("gpt-tiny"))
    assert abs(looped - fixed) / fixed <= 0.02


def test_rdm_baselines() -> None:
    assert get_preset("rdm-add-tiny").injection == "add"
    assert get_preset("rdm-linear-tiny").injection == "linear"
    assert get_preset("parcae-140m", injection="linear").injection == "linear"


def test_defaults_are_the_paper_recipe() -> None:
    cfg = ParcaeConfig(vocab_size=256, d_model=128, n_heads=2, n_prelude=1, n_core=1, n_coda=1, mean_recurrence=5)
    assert cfg.backprop_depth == math.ceil(5 / 2) == 3
    assert cfg.head_dim == 64 and cfg.d_mlp == 512 and cfg.d_state == 128 and cfg.n_kv_heads == 2


def test_value_embedding_layers_alternate_ending_with_the_last() -> None:
    cfg = get_preset("parcae-140m")
    assert [i for i in range(cfg.n_layers) if cfg.has_value_embedding(i)] == [1, 3, 5]
    assert not get_preset("parcae-140m", value_embeddings=False).has_value_embedding(5)


def test_roundtrip_and_replace(tmp_path) -> None:
    cfg = get_preset("parcae-tiny")
    cfg.save(tmp_path / "c.json")
    assert ParcaeConfig.load(tmp_path / "c.json") == cfg
    assert cfg.replace(mean_recurrence=12).backprop_depth == 6
    assert cfg.replace(d_model=256, n_heads=4).d_mlp == 1024
    with pytest.raises(ValueError, match="Unknown ParcaeConfig field"):
        cfg.replace(depth=3)
    with pytest.raises(ValueError, match="Unknown ParcaeConfig field"):
        ParcaeConfig.from_dict({"dmodel": 3})


BAD_CONFIGS = {
    "d_model": dict(d_model=130, n_heads=4),
    "cannot exceed mean_recurrence": dict(depth_sampling="fixed", mean_recurrence=4, backprop_depth=6),
    "unknown injection": dict(injection="concat"),
    "needs d_state == d_model": dict(injection="add", d_state=64),
    "unknown mlp": dict(mlp="gelu"),
    "unknown depth_sampling": dict(depth_sampling="poisson"),
    "unknown state_init": dict(state_init="ones"),
    "n_heads .* multiple of n_kv_heads": dict(n_kv_heads=3),
    "head_dim must be even": dict(d_model=126, n_heads=2, head_dim=63),
    "at least one layer": dict(n_prelude=0, n_core=0, n_coda=0),
    "n_core must be a non-negative": dict(n_core=-1),
    "mean_recurrence must be a positive": dict(mean_recurrence=0),
    "vocab_size must be a positive": dict(vocab_size=0),
    "d_state .* multiple of head_dim": dict(d_state=100),
}


@pytest.mark.parametrize(("message", "fields"), BAD_CONFIGS.items(), ids=list(BAD_CONFIGS))
def test_invalid_configs_raise_one_clear_sentence(message: str, fields: dict) -> None:
    base = dict(vocab_size=256, d_model=128, n_heads=2, n_prelude=1, n_core=1, n_coda=1)
    with pytest.raises(ValueError, match=message) as info:
        ParcaeConfig(**{**base, **fields})
    assert "\n" not in str(info.value)


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="Unknown preset"):
        get_preset("parcae-9b")
    assert "parcae-tiny" in parcae.preset_names()
