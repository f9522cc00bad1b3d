"""evaluate: slide-level cross-validation, its tables, baselines.

Names are imported from their modules on first use (``magnet --help`` stays light).
"""

from magnet_st.util.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "AGGREGATED": "tables",
        "BASELINE": "tables",
        "BASELINE_NAMES": "baselines",
        "GENE_PCC": "cv",
        "HEAD": "tables",
        "METRICS": "tables",
        "PROTOCOLS": "tables",
        "RIDGE": "tables",
        "RidgeBaseline": "baselines",
        "create_baseline": "baselines",
        "cross_validate": "cv",
        "fit_slides": "cv",
        "group_summary": "tables",
        "load_baseline": "baselines",
        "make_folds": "cv",
        "markdown_groups": "tables",
        "markdown_paired": "tables",
        "markdown_per_slide": "tables",
        "markdown_summary": "tables",
        "paired_table": "tables",
        "planted_groups": "cv",
        "protocol_line": "tables",
        "read_gene_groups": "cv",
        "summary_table": "tables",
        "top_variable": "cv",
        "torch_payload": "cv",
        "write_tables": "tables",
    },
)
