"""The Celery app without the worker's tasks, for the processes that only schedule or watch:
`celery -A shared.beat_app beat` and `celery -A shared.beat_app flower`.

It imports no torch (worker.celery_app does, through the engine), so beat and Flower run in the
API image. Beat sends the scheduled tasks by name; their routes and the schedule are
shared.queue.make_celery's, the same the worker's app is built from.
"""

from shared.logs import configure_logging
from shared.queue import make_celery
from shared.settings import Settings

settings = Settings()
configure_logging(settings.log_level, settings.log_format)
app = make_celery(settings)
