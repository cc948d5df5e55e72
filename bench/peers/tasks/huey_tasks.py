"""The no-op task for Huey: SqliteHuey or RedisHuey, each with its defaults."""

import os

from done import record
from huey import RedisHuey, SqliteHuey

if os.environ["HQBENCH_HUEY"] == "sqlite":
    huey = SqliteHuey("bench", filename=os.environ["HQBENCH_HUEY_FILE"])
else:
    huey = RedisHuey("bench", url=os.environ["HQBENCH_REDIS"])


@huey.task()
def noop():
    record()
    return True
