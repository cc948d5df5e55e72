"""The PostgreSQL store's schema: its migrations (each applied once, in its own
transaction, under an advisory lock) and the statement of each write kind of a
WriteBatch, read by postgres.py.

The tables mirror the SQLite store's (sqlite_schema.py): the same columns, times
as seconds since the epoch (float8), JSON as text. Every table lives in the
schema given by ``--pg-schema`` (the connection's search_path).
"""

from __future__ import annotations

import re

MIGRATIONS: list[tuple[str, str]] = [
    (
        "create jobs, attempts, settings and schedules",
        """
        CREATE TABLE jobs (
            id               bigint  PRIMARY KEY,
            task             text    NOT NULL,
            queue            text    NOT NULL,
            status           text    NOT NULL,
            args             text    NOT NULL,
            result           text,
            error            text,
            attempts         integer NOT NULL DEFAULT 0,
            max_attempts     integer NOT NULL,
            priority         integer NOT NULL DEFAULT 0,
            progress         float8,
            progress_message text,
            key              text,
            run_id           text,
            created_at       float8  NOT NULL,
            started_at       float8,
            finished_at      float8,
            run_at           float8  NOT NULL,
            deadline         float8,
            timeout          float8,
            abort_requested  boolean NOT NULL DEFAULT false,
            worker_pid       integer,
            cpu_seconds      float8,
            peak_rss         bigint,
            interruptions    integer NOT NULL DEFAULT 0
        ) WITH (fillfactor = 80);  -- room on each page: a job's updates stay HOT
        -- Loading the pending set at start, in dispatch order.
        CREATE INDEX jobs_pending ON jobs (queue, priority DESC, id) WHERE status = 'pending';
        -- Recovery at start: the jobs a dead supervisor left running.
        CREATE INDEX jobs_running ON jobs (id) WHERE status = 'running';
        -- At most one unfinished job per idempotency key, whatever the supervisor does.
        CREATE UNIQUE INDEX jobs_key ON jobs (key)
            WHERE key IS NOT NULL AND status IN ('pending', 'running');
        CREATE INDEX jobs_run ON jobs (run_id) WHERE run_id IS NOT NULL;
        CREATE INDEX jobs_key_completed ON jobs (key, finished_at)
            WHERE key IS NOT NULL AND status = 'completed';
        -- Counts, listing and retention of ended jobs, by state and queue.
        CREATE INDEX jobs_ended ON jobs (status, queue, finished_at)
            WHERE finished_at IS NOT NULL;
        CREATE TABLE attempts (
            seq         bigserial PRIMARY KEY,
            job_id      bigint  NOT NULL,
            attempt     integer NOT NULL,
            status      text    NOT NULL,
            error       text,
            worker_pid  integer,
            started_at  float8,
            finished_at float8,
            cpu_seconds float8,
            peak_rss    bigint
        );
        CREATE INDEX attempts_job ON attempts (job_id);
        CREATE TABLE settings (
            name  text PRIMARY KEY,
            value text NOT NULL
        );
        CREATE TABLE schedules (
            name     text PRIMARY KEY,
            next_run float8 NOT NULL,
            last_run float8,
            last_job bigint,
            cron     text NOT NULL,
            timezone text NOT NULL
        )
        """,
    ),
    (
        "several hosts: hosts and their leases, job owners, ids handed out in blocks",
        """
        -- One row per live supervisor (a "host"); ids are never used twice, so a
        -- host that lost its lease and comes back is a new host.
        CREATE SEQUENCE host_ids;
        CREATE TABLE hosts (
            id          bigint  PRIMARY KEY,
            name        text    NOT NULL,
            pid         integer NOT NULL,
            -- The PID namespace of pid (its inode): a PID is told alive or gone only
            -- from the same namespace (containers on one machine share a name).
            pidns       bigint,
            socket      text,
            workers     integer NOT NULL DEFAULT 0,
            version     text,
            started_at  float8  NOT NULL,
            renewed_at  float8  NOT NULL,
            lease_until float8  NOT NULL,
            -- The number of this host's last committed write transaction: after a
            -- connection lost during COMMIT, it tells whether the COMMIT was stored.
            last_batch  bigint  NOT NULL DEFAULT 0
        ) WITH (fillfactor = 50);  -- a host's row is updated by each of its transactions
        -- The host whose book holds the job (NULL: released, for any host to claim).
        ALTER TABLE jobs ADD COLUMN owner bigint;
        -- Claims: released jobs in dispatch order, and when the next delayed one is due.
        CREATE INDEX jobs_released ON jobs (priority DESC, id)
            WHERE status = 'pending' AND owner IS NULL;
        CREATE INDEX jobs_released_due ON jobs (run_at)
            WHERE status = 'pending' AND owner IS NULL;
        CREATE INDEX jobs_released_deadline ON jobs (deadline)
            WHERE status = 'pending' AND owner IS NULL AND deadline IS NOT NULL;
        -- Rescue: the unfinished jobs of a host whose lease lapsed.
        CREATE INDEX jobs_owned ON jobs (owner)
            WHERE owner IS NOT NULL AND status IN ('pending', 'running');
        -- Job ids: each host takes a range at a time (one row, bumped under its lock).
        CREATE TABLE job_ids (next bigint NOT NULL);
        INSERT INTO job_ids SELECT COALESCE(MAX(id), 0) + 1 FROM jobs;
        """,
    ),
]

# The schema's version, one row; made before the first migration.
VERSION_TABLE = "CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)"

# This host's id, set on the writer's session when it joins (hosts.id).
OWNER = "NULLIF(current_setting('hostqueue.host', true), '')::bigint"
# The database's clock, in seconds since the epoch: leases are timed by one clock.
DB_NOW = "extract(epoch from clock_timestamp())::float8"

# The statements of each write kind (batch.py), with the parameters in the order
# batch.py gives them (the SQLite store's order). A transition is guarded by the
# status it leaves: its last two parameters are that status, then the job's id.
WRITES: dict[str, str] = {
    # The jobs of one submit, in one statement: ids $1, $1 + 1, ..., one per element
    # of a JSON array of their args texts.
    "add_jobs": (
        "INSERT INTO jobs (id, task, queue, status, args, attempts, max_attempts, priority,"
        " key, run_id, created_at, run_at, deadline, timeout, owner)"
        " SELECT $1::bigint + t.n - 1, $2::text, $3::text, 'pending', t.v, 0, $4::integer,"
        " $5::integer, $6::text, $7::text, $8::float8, $9::float8, $10::float8, $11::float8,"
        " " + OWNER + " FROM json_array_elements_text($12::json) WITH ORDINALITY AS t(v, n)"
    ),
    # Jobs this host does not keep (its workers are busy): released, for any host to
    # claim; a NOTIFY in the same transaction wakes the hosts with room.
    "add_released": (
        "INSERT INTO jobs (id, task, queue, status, args, attempts, max_attempts, priority,"
        " key, run_id, created_at, run_at, deadline, timeout)"
        " SELECT $1::bigint + t.n - 1, $2::text, $3::text, 'pending', t.v, 0, $4::integer,"
        " $5::integer, $6::text, $7::text, $8::float8, $9::float8, $10::float8, $11::float8"
        " FROM json_array_elements_text($12::json) WITH ORDINALITY AS t(v, n)"
    ),
    # One job, held at once by the worker it was handed to (the SQLite store keeps such
    # rows out of its index of waiting jobs; here the same row, with worker_pid).
    "add_held": (
        "INSERT INTO jobs (id, task, queue, status, args, attempts, max_attempts, priority,"
        " key, run_id, created_at, run_at, deadline, timeout, worker_pid, owner)"
        " SELECT $1::bigint + t.n - 1, $2::text, $3::text, 'pending', t.v, 0, $4::integer,"
        " $5::integer, $6::text, $7::text, $8::float8, $9::float8, $10::float8, $11::float8,"
        " $13::integer, " + OWNER + " FROM json_array_elements_text($12::json) WITH ORDINALITY AS t(v, n)"
    ),
    "start": (
        "UPDATE jobs SET status = 'running', attempts = $1::integer, started_at = $2::float8,"
        " worker_pid = $3::integer, finished_at = NULL WHERE status = $4::text AND id = $5::bigint"
    ),
    "finish": (
        "UPDATE jobs SET status = $1::text, result = $2::text, error = $3::text,"
        " finished_at = $4::float8, progress = COALESCE($5::float8, progress),"
        " progress_message = COALESCE($6::text, progress_message), cpu_seconds = $7::float8,"
        " peak_rss = $8::bigint, attempts = $9::integer, started_at = $10::float8,"
        " worker_pid = $11::integer, interruptions = 0 WHERE status = $12::text AND id = $13::bigint"
    ),
    "retry_later": (
        "UPDATE jobs SET status = 'pending', run_at = $1::float8, error = $2::text,"
        " attempts = $3::integer, progress = COALESCE($4::float8, progress),"
        " progress_message = COALESCE($5::text, progress_message), started_at = NULL,"
        " worker_pid = NULL, interruptions = 0 WHERE status = $6::text AND id = $7::bigint"
    ),
    "requeue": (
        "UPDATE jobs SET status = 'pending', attempts = $1::integer, run_at = $2::float8,"
        " started_at = NULL, worker_pid = NULL WHERE status = $3::text AND id = $4::bigint"
    ),
    "cancel_pending": (
        "UPDATE jobs SET status = $1::text, finished_at = $2::float8, error = $3::text"
        " WHERE status = $4::text AND id = $5::bigint"
    ),
    "revive": (
        "UPDATE jobs SET status = 'pending', attempts = 0, interruptions = 0, run_at = $1::float8,"
        " result = NULL, error = NULL, finished_at = NULL, started_at = NULL,"
        " abort_requested = false, progress = NULL, progress_message = NULL, worker_pid = NULL,"
        " owner = " + OWNER + " WHERE status = $2::text AND id = $3::bigint"
    ),
    "request_abort": "UPDATE jobs SET abort_requested = true WHERE id = $1::bigint",
    "record_progress": (
        "UPDATE jobs SET progress = $1::float8, progress_message = $2::text"
        " WHERE status = 'running' AND id = $3::bigint"
    ),
    "record_attempt": (
        "INSERT INTO attempts (job_id, attempt, status, error, worker_pid, started_at,"
        " finished_at, cpu_seconds, peak_rss) VALUES ($1::bigint, $2::integer, $3::text,"
        " $4::text, $5::integer, $6::float8, $7::float8, $8::float8, $9::bigint)"
    ),
    "forget_ended": (
        "DELETE FROM jobs WHERE id = $1::bigint AND status = $2::text AND finished_at < $3::float8"
    ),
    "forget_attempts": (
        "DELETE FROM attempts WHERE job_id = $1::bigint"
        " AND NOT EXISTS (SELECT 1 FROM jobs WHERE id = $2::bigint)"
    ),
    "save_setting": (
        "INSERT INTO settings (name, value) VALUES ($1::text, $2::text)"
        " ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value"
    ),
    "save_schedule": (
        "INSERT INTO schedules (name, next_run, last_run, last_job, cron, timezone)"
        " VALUES ($1::text, $2::float8, $3::float8, $4::bigint, $5::text, $6::text)"
        " ON CONFLICT (name) DO UPDATE SET next_run = EXCLUDED.next_run,"
        " last_run = EXCLUDED.last_run, last_job = EXCLUDED.last_job, cron = EXCLUDED.cron,"
        " timezone = EXCLUDED.timezone"
    ),
}

_PARAM = re.compile(r"\$(\d+)::(\w+)")


def batched(kind: str) -> str:
    """The statement of a guarded UPDATE kind for many jobs at once: its parameters
    become arrays, one element per job, walked by unnest. One round trip, and its
    status ("UPDATE n") says how many jobs it changed, which executemany does not.
    UPDATE ... FROM changes each row once, with one of its matching elements: only
    for runs in which each job appears once (postgres.py checks)."""
    sql = WRITES[kind]
    if not sql.startswith("UPDATE jobs SET "):
        raise ValueError(f"{kind} is not a guarded update")
    params: dict[int, str] = {}
    for number, type_ in _PARAM.findall(sql):
        params[int(number)] = type_
    count = max(params)
    body = _PARAM.sub(lambda m: f"v.p{m.group(1)}", sql[len("UPDATE jobs SET "):])
    arrays = ", ".join(f"${n}::{params[n]}[]" for n in range(1, count + 1))
    names = ", ".join(f"p{n}" for n in range(1, count + 1))
    # Columns named alone refer to jobs (the old row): qualify the guard's.
    body = body.replace(" WHERE status = ", " WHERE jobs.status = ").replace(
        " AND id = ", " AND jobs.id = ")
    return f"UPDATE jobs SET {body.split(' WHERE ')[0]} FROM unnest({arrays}) AS v({names})" \
           f" WHERE {body.split(' WHERE ')[1]}"


# == several hosts =========================================================
CLAIM = (
    "WITH me AS (SELECT id FROM hosts WHERE id = $1::bigint AND lease_until > " + DB_NOW
    + " FOR KEY SHARE), picked AS (SELECT id FROM jobs WHERE status = 'pending'"
    " AND owner IS NULL AND run_at <= $2::float8 {where} ORDER BY {order}"
    " LIMIT $4::integer FOR UPDATE SKIP LOCKED)"
    " UPDATE jobs SET owner = $1::bigint FROM picked WHERE jobs.id = picked.id"
    " AND EXISTS (SELECT 1 FROM me)"
    " RETURNING jobs.id, jobs.task, jobs.queue, jobs.args, jobs.attempts, jobs.max_attempts,"
    " jobs.timeout, jobs.abort_requested, jobs.run_id, jobs.priority, jobs.key,"
    " jobs.created_at, jobs.run_at, jobs.deadline"
)

# Statements of the hosts' leases, claims and rescue (postgres.py's cluster part).
# Times come from the database's clock: hosts' clocks may disagree.
CLUSTER: dict[str, str] = {
    "join": (
        "INSERT INTO hosts (id, name, pid, pidns, socket, workers, version, started_at,"
        " renewed_at, lease_until) SELECT nextval('host_ids'), $1::text, $2::integer,"
        " $7::bigint, $3::text, $4::integer, $5::text, n, n, n + $6::float8"
        " FROM (SELECT " + DB_NOW + " AS n) t RETURNING id"
    ),
    # The lease, renewed; no row: it lapsed (and another host may have taken its jobs).
    # The lease, renewed (its seconds left; NULL: it had lapsed, and another host may
    # have taken its jobs), and whether some host's lease lapsed: one round trip.
    "renew": (
        "WITH t AS (SELECT " + DB_NOW + " AS n), r AS (UPDATE hosts SET renewed_at = t.n,"
        " lease_until = t.n + $2::float8, workers = $3::integer FROM t WHERE id = $1::bigint"
        " AND lease_until > t.n RETURNING lease_until - t.n AS remaining)"
        " SELECT (SELECT remaining FROM r), EXISTS (SELECT 1 FROM hosts, t WHERE lease_until < t.n"
        " AND id <> $1::bigint), (SELECT COUNT(*) FROM hosts, t WHERE lease_until >= t.n"
        " AND id <> $1::bigint)"
    ),
    # First in every write transaction: this host still holds its lease, and keeps its
    # row (a rescue deletes it) until the transaction ends. No row: fenced.
    "fence": (
        "SELECT 1 FROM hosts WHERE id = " + OWNER + " AND lease_until > " + DB_NOW
        + " FOR KEY SHARE"
    ),
    # The same for a batch of the group commit, numbered: the number is stored with
    # the batch, so that a COMMIT whose answer was lost can be told stored or not.
    # (two integers of ours are put in: it is sent with BEGIN as one simple query)
    "fence_batch": (
        "BEGIN; UPDATE hosts SET last_batch = {batch:d} WHERE id = {host:d} AND lease_until > "
        + DB_NOW
    ),
    "last_batch": "SELECT last_batch FROM hosts WHERE id = " + OWNER,
    # Hosts whose lease lapsed, gone; their jobs are rescued in the same transaction.
    "lapsed": (
        "DELETE FROM hosts WHERE lease_until < " + DB_NOW + " OR id = ANY($1::bigint[])"
        " RETURNING id, name, pid"
    ),
    "leave": "DELETE FROM hosts WHERE id = $1::bigint",
    "hosts": (
        "SELECT id, name, pid, socket, workers, version, started_at, renewed_at,"
        " lease_until - " + DB_NOW + " FROM hosts ORDER BY id"
    ),
    "same_place": (
        "SELECT id, pid FROM hosts WHERE name = $1::text AND socket = $2::text"
        " AND pidns = $3::bigint"
    ),
    # Pending jobs of gone hosts (and of none, held by a worker: a store of before
    # several hosts): released, not held by anyone.
    "release_pending": (
        "UPDATE jobs SET owner = NULL, worker_pid = NULL WHERE status = 'pending'"
        " AND (owner = ANY($1::bigint[]) OR (owner IS NULL AND worker_pid IS NOT NULL))"
    ),
    # Running jobs of gone hosts (or of no host: a store of before several hosts).
    "interrupted": (
        "SELECT id, attempts, interruptions, worker_pid, started_at FROM jobs"
        " WHERE status = 'running' AND (owner = ANY($1::bigint[]) OR owner IS NULL) FOR UPDATE"
    ),
    "interrupted_attempt": (
        "INSERT INTO attempts (job_id, attempt, status, error, worker_pid, started_at,"
        " finished_at) VALUES ($1::bigint, $2::integer, 'interrupted', $3::text, $4::integer,"
        " $5::float8, $6::float8)"
    ),
    "interrupted_fail": (
        "UPDATE jobs SET status = 'failed', finished_at = $1::float8, error = $2::text,"
        " interruptions = interruptions + 1, owner = NULL WHERE status = 'running' AND id = $3::bigint"
    ),
    "interrupted_again": (
        "UPDATE jobs SET status = 'pending', attempts = GREATEST(attempts - 1, 0),"
        " interruptions = interruptions + 1, run_at = LEAST(run_at, $1::float8),"
        " started_at = NULL, worker_pid = NULL, owner = NULL"
        " WHERE status = 'running' AND id = $2::bigint"
    ),
    # Released jobs that are due, in dispatch order, taken by this host: one statement,
    # fenced like a write transaction (no row taken unless its lease is live).
    "claim": CLAIM.format(where="AND NOT (queue = ANY($3::text[]))", order="priority DESC, id"),
    # The same, with queues in a strict order (queues.order = "strict"): the queues
    # named first, whatever the priorities (a sort of the released jobs, no index).
    "claim_strict": CLAIM.format(
        where="AND NOT (queue = ANY($3::text[]))",
        order="COALESCE(array_position($5::text[], queue), 2147483647), priority DESC, id"),
    "next_due": (
        "SELECT MIN(run_at) FROM jobs WHERE status = 'pending' AND owner IS NULL"
        " AND run_at > $1::float8"
    ),
    # Jobs this host will not run after all (a pause, a drain): released again.
    "release": (
        "UPDATE jobs SET owner = NULL, worker_pid = NULL WHERE id = ANY($1::bigint[])"
        " AND status = 'pending' AND owner = $2::bigint RETURNING run_at, deadline"
    ),
    # A queue with a concurrency cap across hosts: its jobs held or running anywhere
    # (counted under a lock of the queue's, so that two hosts cannot both see room).
    "queue_active": (
        "SELECT COUNT(*) FROM jobs WHERE queue = $1::text AND owner IS NOT NULL"
        " AND status IN ('pending', 'running')"
    ),
    "claim_queue": CLAIM.format(where="AND queue = $3::text", order="priority DESC, id"),
    # Released jobs whose deadline passed before any host could claim them.
    "expire_released": (
        "UPDATE jobs SET status = 'expired', finished_at = $1::float8, error = $2::text"
        " WHERE status = 'pending' AND owner IS NULL AND deadline <= $1::float8 RETURNING id"
    ),
    "next_deadline": (
        "SELECT MIN(deadline) FROM jobs WHERE status = 'pending' AND owner IS NULL"
        " AND deadline > $1::float8"
    ),
    "released_by_queue": (
        "SELECT queue, COUNT(*) FROM jobs WHERE status = 'pending' AND owner IS NULL"
        " AND run_at <= $1::float8 GROUP BY queue"
    ),
    "ids": "UPDATE job_ids SET next = next + $1::bigint RETURNING next - $1::bigint",
    # A job another host owns: where it is (abort asks its owner).
    "owners": "SELECT id, owner, status FROM jobs WHERE id = ANY($1::bigint[])",
    # An operator's retry of an ended job, by a host of several: this host's from now on.
    "revive": WRITES["revive"] + " RETURNING 1",
    "cancel_released": (
        "UPDATE jobs SET status = 'cancelled', finished_at = $1::float8, error = $2::text"
        " WHERE id = $3::bigint AND status = 'pending' AND owner IS NULL"
    ),
}
