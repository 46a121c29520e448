"""Celery's own settings. The service's settings live in schemas.settings (`ENRICH_*`)."""

from kombu import Exchange, Queue

from schemas.settings import get_settings

_settings = get_settings()

broker_url = _settings.broker_url.get_secret_value()
broker_connection_retry_on_startup = True
broker_connection_max_retries = None
# Publisher confirms: apply_async returns only once RabbitMQ has the task message.
broker_transport_options = {"confirm_publish": True}
broker_heartbeat = 30

task_default_queue = _settings.task_queue
task_queues = (
    Queue(
        _settings.task_queue,
        Exchange(_settings.task_queue, type="direct"),
        routing_key=_settings.task_queue,
        durable=True,
    ),
    # Backfilled products wait here, apart from uploads: a worker consumes both queues, so an
    # upload waits for the task in hand, never behind a backfill's whole backlog.
    Queue(
        _settings.backfill_queue,
        Exchange(_settings.backfill_queue, type="direct"),
        routing_key=_settings.backfill_queue,
        durable=True,
    ),
)
task_routes = {
    "enrichment.start_backfill": {"queue": _settings.backfill_queue},
    "enrichment.expand_backfill_chunk": {"queue": _settings.backfill_queue},
}
task_serializer = "json"
accept_content = ["json"]
task_ignore_result = True
result_backend = None

# At-least-once: a task is acknowledged after it ran, and handed back when its process dies.
task_acks_late = True
task_reject_on_worker_lost = True
task_acks_on_failure_or_timeout = True
worker_prefetch_multiplier = 1
# RabbitMQ closes a channel that holds a message unacknowledged past its consumer_timeout;
# schemas.settings.BatchSettings checks that this limit and a retry's countdown fit below it.
# Only prefork enforces it; a threads pool bounds its batch waits (worker.batching) instead.
task_soft_time_limit = _settings.batch.task_time_limit_s

# One process holds the models; on a GPU more processes only compete for it.
worker_concurrency = 1
worker_max_tasks_per_child = None
# A pool process loads its models before it reports for work; on a busy CPU that takes far
# longer than Celery's default 4 s, after which the process would be killed and respawned.
worker_proc_alive_timeout = 180
worker_hijack_root_logger = False
worker_redirect_stdouts = False
worker_send_task_events = True
task_send_sent_event = True
