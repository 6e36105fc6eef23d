"""Evaluation reports from plain tables: ``tables`` (CSV, aggregation, pooled reliability tables),
``plots`` (reliability diagrams, UEO-vs-τ and budget curves as PNG, matplotlib imported on use)
and ``text`` (report.md)."""
