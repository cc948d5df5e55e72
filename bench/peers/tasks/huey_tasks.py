"""The no-op task for Huey: SqliteHuey or RedisHuey, each with its defaults."""

import os

from huey import RedisHuey, SqliteHuey

from done import record

if os.environ["HQBENCH_HUEY"] == "sqlite":
    huey = SqliteHuey("bench", filename=os.environ["HQBENCH_HUEY_FILE"])
else:
    huey = RedisHuey("bench", url=os.environ["HQBENCH_REDIS"])


@huey.task()
def noop():
    record()
    return True
