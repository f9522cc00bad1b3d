"""features: frozen encoder features: encoders, per-unit patches, dense maps, the store.

Names are imported from their modules on first use (``magnet --help`` stays light).
"""

from magnet_st.util.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "DEFAULT_ENCODER": "encoders",
        "DEFAULT_LEVELS": "store",
        "DEFAULT_MPP": "dense",
        "DenseConfig": "dense",
        "Encoder": "encoders",
        "FEATURES_DIR": "store",
        "MIN_READ_CAP": "patches",
        "MapSpec": "dense",
        "OFFLINE_ENCODERS": "backbones",
        "Preprocess": "encoders",
        "TileCutter": "patches",
        "cell_offset": "dense",
        "create_backbone": "backbones",
        "create_encoder": "encoders",
        "data_config": "encoders",
        "encoder_key": "encoders",
        "extract_features": "extract",
        "feature_set_meta": "store",
        "list_feature_sets": "store",
        "load_backbone_weights": "backbones",
        "load_features": "store",
        "load_state_dict": "backbones",
        "map_specs": "dense",
        "pool_tile": "dense",
        "read_px": "patches",
        "resolve_device": "encoders",
    },
)
