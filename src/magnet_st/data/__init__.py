"""data: the prepared-dataset format: layout, Dataset, slides, levels, panel, targets, graphs, on-disk rows.

Names are imported from their modules on first use (``magnet --help`` stays light).
"""

from magnet_st.util.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "Dataset": "dataset",
        "KINDS": "targets",
        "MAX_IMAGE_MM": "slide",
        "METHODS": "panel",
        "NpyRows": "ondisk",
        "PanelCounts": "ondisk",
        "Slide": "slide",
        "TARGET_SUM": "targets",
        "TargetTransform": "targets",
        "TrainingPanel": "panel",
        "column_index": "panel",
        "gene_columns": "panel",
        "knn_adjacency": "graph",
        "knn_edges": "graph",
        "log1p_moments": "targets",
        "n_rows": "ondisk",
        "per_10k_rows": "targets",
        "per_10k_scale": "targets",
        "read_element": "ondisk",
        "read_rows": "panel",
        "select_columns": "panel",
        "select_panel": "panel",
        "training_panel": "panel",
        "training_targets": "panel",
        "usable_genes": "panel",
    },
)
