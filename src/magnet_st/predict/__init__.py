"""predict: prediction: the model file, inference without Lightning, image-only prediction.

Names are imported from their modules on first use (``magnet --help`` stays light).
"""

from magnet_st.util.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "CAPTURE_AREA_UM": "image",
        "COARSE_LEVELS": "modelfile",
        "COARSE_SOURCES": "modelfile",
        "HIRES_MAX_PX": "image",
        "LEVEL_FILES": "image",
        "UNIT_FILES": "image",
        "LOWRES_MAX_PX": "image",
        "MODEL_FORMAT": "modelfile",
        "MODEL_FORMAT_VERSION": "modelfile",
        "OneThumbnail": "image",
        "PredictResult": "image",
        "aggregate_bins": "modelfile",
        "bins_add_up": "modelfile",
        "check_schema": "modelfile",
        "choose_coarse": "modelfile",
        "coarse_scores": "modelfile",
        "coarse_sources": "modelfile",
        "compose_coarse": "modelfile",
        "default_max_bins": "image",
        "level_files": "image",
        "load_model": "modelfile",
        "predict": "image",
        "predict_slide": "modelfile",
        "save_model": "modelfile",
        "seen_in_training": "image",
        "spatial_uns": "image",
    },
)
