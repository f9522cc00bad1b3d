"""model: MagNet, its losses and metrics, spatial batches and the inputs it takes (no Lightning).

Names are imported from their modules on first use (``magnet --help`` stays light).
"""

from magnet_st.util.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "BetweenGroupShare": "metrics",
        "BinEncoder": "magnet",
        "BlockDataset": "batching",
        "CONSISTENCY_FORMS": "losses",
        "Columns": "inputs",
        "ContextAttention": "magnet",
        "DenseTileReader": "densebin",
        "GATStack": "magnet",
        "GenePearson": "metrics",
        "LayerTransformer": "magnet",
        "LossWeights": "losses",
        "MagNet": "magnet",
        "MagNetConfig": "magnet",
        "PCC_AXES": "losses",
        "PatchReader": "inputs",
        "READOUTS": "magnet",
        "SlideArrays": "batching",
        "StreamingEvaluation": "metrics",
        "VARIANTS": "magnet",
        "aggregate_bins": "losses",
        "bin_batches": "batching",
        "blocks": "batching",
        "chosen_epochs": "metrics",
        "create_model": "magnet",
        "dense_settings": "densebin",
        "evaluate": "metrics",
        "footprint_weights": "densebin",
        "magnet_loss": "losses",
        "make_batch": "batching",
        "model_inputs": "inputs",
        "model_reader": "inputs",
        "pcc": "losses",
        "pcc_per_gene": "metrics",
        "pcc_per_unit": "metrics",
        "pcc_rows": "losses",
        "pool_maps": "densebin",
        "rate_consistency": "losses",
        "slide_arrays": "inputs",
        "sum_rates": "losses",
        "summarize": "metrics",
    },
)
