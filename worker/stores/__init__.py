"""Postgres, S3 and image stores."""
