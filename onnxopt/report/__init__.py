"""Reports: JSON for machines, Markdown and a PNG trajectory plot for people."""

from onnxopt.report.schema import SCHEMA_VERSION, RunReport, StepMetrics, StepRecord
from onnxopt.report.writers import render_markdown, write_reports

__all__ = ["SCHEMA_VERSION", "RunReport", "StepMetrics", "StepRecord", "render_markdown", "write_reports"]
