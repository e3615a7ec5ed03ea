"""A live web page for one A/B experiment, served from ClickHouse (``abdag dashboard``).

The JSON it serves is built from the same code as ``abdag report``
(:func:`abdag.comparators.report.build_report`), so the page and the CLI never disagree; the
curves over time come from :mod:`abdag.dashboard.data`.
"""

from abdag.dashboard.server import make_server, serve

__all__ = ["make_server", "serve"]
