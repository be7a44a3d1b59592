"""``rana``, the command line: the top of the project, above the core, the database, the queue and the dashboard.

It may import every package (and the dashboard's only to locate it); nothing imports it, and nothing below it
starts the dashboard (tests/test_layering.py checks both).
"""
