"""Celery glue: app, tasks, event intake, stores and the command line."""
