"""The no-op actor for Dramatiq: the Redis broker and the Results middleware on Redis
(needed to wait for a result), otherwise defaults."""

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

broker = RedisBroker(url=os.environ["HQBENCH_REDIS"])
broker.add_middleware(Results(backend=RedisBackend(url=os.environ["HQBENCH_REDIS"])))
dramatiq.set_broker(broker)

from done import record


@dramatiq.actor(store_results=True)
def noop():
    record()
    return True
