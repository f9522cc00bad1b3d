"""train: training: the LightningModule and fit.

Names are imported from their modules on first use (``magnet --help`` stays light).
"""

from magnet_st.util.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "BIN_INPUTS": "trainer",
        "EpochShuffle": "trainer",
        "FitResult": "trainer",
        "MACHINE_KEYS": "trainer",
        "MagNetModule": "trainer",
        "RANDOM_BIN_WEIGHTS": "trainer",
        "SpatialDataModule": "trainer",
        "TrainConfig": "trainer",
        "TrainingDiverged": "trainer",
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
