"""Model stages: segmentation, tagging and embedding. None of them imports Celery."""
