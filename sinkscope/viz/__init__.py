"""Figures and HTML reports of sinkscope runs (plotly; offline, self-contained).

``page`` writes every page; one module per analysis holds its figures, findings and report section
(``scan_report``, ``probe_report``, ``flow_report``, ``decoding``, ``redundancy``, ``relevancy``);
``report`` assembles the sections of ``sinkscope report``.
"""

from sinkscope.viz.report import write_report, write_result_page
from sinkscope.viz.scan_report import write_scan_report

__all__ = ["write_report", "write_result_page", "write_scan_report"]
