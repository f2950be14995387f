"""Reports: markdown and JSON tables, PNG plots, and one self-contained HTML page."""

from slimkit.reports.tables import comparison_rows, markdown_table, report_markdown, rich_table

__all__ = ["comparison_rows", "markdown_table", "report_markdown", "rich_table"]
