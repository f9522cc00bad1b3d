"""train: training: its settings (config), the LightningModule (module) and fit (trainer).

Names are imported from their modules on first use (``magnet --help`` stays light).
"""

from magnet_st.util.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "BIN_INPUTS": "config",
        "EpochShuffle": "module",
        "FitResult": "trainer",
        "MACHINE_KEYS": "config",
        "MagNetModule": "module",
        "RANDOM_BIN_WEIGHTS": "trainer",
        "SpatialDataModule": "module",
        "TrainConfig": "config",
        "TrainingDiverged": "config",
        "build_model_config": "trainer",
        "check_bin_start": "trainer",
        "dense_bin_settings": "trainer",
        "fit": "trainer",
        "init_bin_encoder": "trainer",
        "init_head_bias": "trainer",
        "is_main_process": "trainer",
        "record_coarse_choice": "trainer",
        "target_mean": "trainer",
    },
)
