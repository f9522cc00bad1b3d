"""evaluate: slide-level cross-validation, its tables, baselines.

Names are imported from their modules on first use (``magnet --help`` stays light).
"""

from magnet_st.util.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "AGGREGATED": "cv",
        "BASELINE": "cv",
        "BASELINE_NAMES": "baselines",
        "GENE_PCC": "cv",
        "HEAD": "cv",
        "METRICS": "cv",
        "PROTOCOLS": "cv",
        "RIDGE": "cv",
        "RidgeBaseline": "baselines",
        "create_baseline": "baselines",
        "cross_validate": "cv",
        "fit_slides": "cv",
        "group_summary": "cv",
        "load_baseline": "baselines",
        "make_folds": "cv",
        "markdown_groups": "cv",
        "markdown_paired": "cv",
        "markdown_per_slide": "cv",
        "markdown_summary": "cv",
        "paired_table": "cv",
        "planted_groups": "cv",
        "protocol_line": "cv",
        "read_gene_groups": "cv",
        "summary_table": "cv",
        "top_variable": "cv",
        "torch_payload": "cv",
        "write_tables": "cv",
    },
)
