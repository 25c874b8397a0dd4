"""A job's report: ``build`` reads it from the store, ``text`` and ``html`` render it."""

from pipeq.report.build import JobReport, WorkerShare, build_report, failure_reason, time_buckets

__all__ = ["JobReport", "WorkerShare", "build_report", "failure_reason", "time_buckets"]
