"""Figures and HTML reports of sinkscope scans (plotly; offline, self-contained)."""

from sinkscope.viz.scan_report import write_scan_report

__all__ = ["write_scan_report"]
