"""Reports: markdown/JSON tables (plots and HTML come with the benchmarks)."""

from slimkit.reports.tables import comparison_rows, markdown_table, report_markdown, rich_table

__all__ = ["comparison_rows", "markdown_table", "report_markdown", "rich_table"]
