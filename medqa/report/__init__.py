"""The report stage's rendering: the metrics tables, decisions, judge section and examples in
reports/report.md, and the plots."""
