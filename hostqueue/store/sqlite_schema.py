"""The SQLite store's schema: its migrations (named steps, each applied once, in its
own transaction) and the statement of each write kind of a WriteBatch.

Every SQL statement of hostqueue lives in this package; these are the SQLite
engine's, read by sqlite.py.
"""

from __future__ import annotations

MIGRATIONS: list[tuple[str, str]] = [
    (
        "create jobs, attempts and settings",
        """
        CREATE TABLE jobs (
            id               INTEGER PRIMARY KEY,
            task             TEXT    NOT NULL,
            queue            TEXT    NOT NULL,
            status           TEXT    NOT NULL,
            args             TEXT    NOT NULL,
            result           TEXT,
            error            TEXT,
            attempts         INTEGER NOT NULL DEFAULT 0,
            max_attempts     INTEGER NOT NULL,
            priority         INTEGER NOT NULL DEFAULT 0,
            progress         REAL,
            progress_message TEXT,
            key              TEXT,
            run_id           TEXT,
            created_at       REAL    NOT NULL,
            started_at       REAL,
            finished_at      REAL,
            run_at           REAL    NOT NULL,
            deadline         REAL,
            timeout          REAL,
            abort_requested  INTEGER NOT NULL DEFAULT 0,
            worker_pid       INTEGER
        );
        -- Loading the pending set at start, in dispatch order.
        CREATE INDEX jobs_pending ON jobs (queue, priority DESC, id) WHERE status = 'pending';
        -- Counts by state and queue, listing by state, recovery of running jobs.
        CREATE INDEX jobs_status ON jobs (status, queue);
        -- At most one unfinished job per idempotency key, whatever the supervisor does.
        CREATE UNIQUE INDEX jobs_key ON jobs (key)
            WHERE key IS NOT NULL AND status IN ('pending', 'running');
        CREATE INDEX jobs_run ON jobs (run_id) WHERE run_id IS NOT NULL;
        CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
        CREATE TABLE attempts (
            job_id      INTEGER NOT NULL,
            attempt     INTEGER NOT NULL,
            status      TEXT    NOT NULL,
            error       TEXT,
            worker_pid  INTEGER,
            started_at  REAL,
            finished_at REAL,
            PRIMARY KEY (job_id, attempt)
        ) WITHOUT ROWID;
        CREATE TABLE settings (
            name  TEXT PRIMARY KEY,
            value TEXT NOT NULL
        ) WITHOUT ROWID;
        """,
    ),
    (
        "resources per attempt, and completed jobs by key for result caching",
        """
        ALTER TABLE jobs ADD COLUMN cpu_seconds REAL;
        ALTER TABLE jobs ADD COLUMN peak_rss INTEGER;
        ALTER TABLE attempts ADD COLUMN cpu_seconds REAL;
        ALTER TABLE attempts ADD COLUMN peak_rss INTEGER;
        CREATE INDEX jobs_key_completed ON jobs (key, finished_at)
            WHERE key IS NOT NULL AND status = 'completed';
        -- Retention: the oldest finished jobs of each state.
        DROP INDEX jobs_finished;
        CREATE INDEX jobs_status_finished ON jobs (status, finished_at)
            WHERE finished_at IS NOT NULL;
        """,
    ),
    (
        "recurring schedules",
        """
        CREATE TABLE schedules (
            name     TEXT PRIMARY KEY,
            next_run REAL NOT NULL,
            last_run REAL,
            last_job INTEGER,
            cron     TEXT NOT NULL,
            timezone TEXT NOT NULL
        ) WITHOUT ROWID;
        """,
    ),
    (
        "attempts as an append-only history (a retried job keeps its earlier errors)",
        """
        CREATE TABLE attempts_log (
            seq         INTEGER PRIMARY KEY,
            job_id      INTEGER NOT NULL,
            attempt     INTEGER NOT NULL,
            status      TEXT    NOT NULL,
            error       TEXT,
            worker_pid  INTEGER,
            started_at  REAL,
            finished_at REAL,
            cpu_seconds REAL,
            peak_rss    INTEGER
        );
        INSERT INTO attempts_log (job_id, attempt, status, error, worker_pid, started_at,
                                  finished_at, cpu_seconds, peak_rss)
            SELECT job_id, attempt, status, error, worker_pid, started_at, finished_at,
                   cpu_seconds, peak_rss
            FROM attempts ORDER BY job_id, attempt;
        DROP TABLE attempts;
        ALTER TABLE attempts_log RENAME TO attempts;
        CREATE INDEX attempts_job ON attempts (job_id);
        """,
    ),
    (
        "no index on the path of every job: running jobs are known in memory, ended ones"
        " by one index",
        """
        -- jobs_status took a write when a job was added running and two when it ended:
        -- about a sixth of a lone job's commit time. Counts of running jobs come from
        -- the supervisor's memory, recovery at start scans for them once, and the
        -- ended states have jobs_ended: counts by state and queue in its order,
        -- retention by state and queue (the oldest first), listing and retry.
        DROP INDEX jobs_status;
        DROP INDEX jobs_status_finished;
        CREATE INDEX jobs_ended ON jobs (status, queue, finished_at)
            WHERE finished_at IS NOT NULL;
        """,
    ),
    (
        "interruptions: a job interrupted by its supervisor's death runs again uncharged,"
        " and ends failed only after 3 in a row",
        """
        ALTER TABLE jobs ADD COLUMN interruptions INTEGER NOT NULL DEFAULT 0;
        """,
    ),
    (
        "waiting jobs indexed apart from held ones: a job handed to a worker as it is"
        " submitted never enters the index",
        """
        -- A one-job submit handed to an idle worker in the turn it arrives is written
        -- held (pending, worker_pid set: "add_held"). Indexed with the waiting jobs, it
        -- cost an index entry added by its INSERT and removed by its end: a sixth of a
        -- lone job's commit time. Held rows are few (prefetch x workers at most);
        -- recovery clears their worker_pid at start, and the supervisor counts them.
        DROP INDEX jobs_pending;
        CREATE INDEX jobs_waiting ON jobs (queue, priority DESC, id)
            WHERE status = 'pending' AND worker_pid IS NULL;
        """,
    ),
]

# The statements of each write kind (batch.py). A transition is guarded by the
# status it leaves: its last two parameters are that status, then the job's id.
WRITES: dict[str, str] = {
    # The jobs of one submit, in one statement: ids first_id, first_id + 1, ...,
    # one per element of a JSON array of their args texts. SQLite walks the array
    # in C, without Python's per-row work (or its lock) in the store's thread.
    "add_jobs": (
        "INSERT INTO jobs (id, task, queue, status, args, attempts, max_attempts, priority,"
        " key, run_id, created_at, run_at, deadline, timeout)"
        " SELECT ?1 + key, ?2, ?3, 'pending', value, 0, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11"
        " FROM json_each(?12)"
    ),
    # One job, held at once by the worker it was handed to: add_jobs' parameters, then
    # the worker's pid.
    "add_held": (
        "INSERT INTO jobs (id, task, queue, status, args, attempts, max_attempts, priority,"
        " key, run_id, created_at, run_at, deadline, timeout, worker_pid)"
        " SELECT ?1 + key, ?2, ?3, 'pending', value, 0, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?13"
        " FROM json_each(?12)"
    ),
    # held -> running: the task started in a worker.
    "start": (
        "UPDATE jobs SET status = 'running', attempts = ?, started_at = ?, worker_pid = ?,"
        " finished_at = NULL WHERE status = ? AND id = ?"
    ),
    # running (or held, for an attempt that started and ended between two reports)
    # -> completed, failed, cancelled.
    "finish": (
        "UPDATE jobs SET status = ?, result = ?, error = ?, finished_at = ?,"
        " progress = COALESCE(?, progress), progress_message = COALESCE(?, progress_message),"
        " cpu_seconds = ?, peak_rss = ?, attempts = ?, started_at = ?, worker_pid = ?,"
        " interruptions = 0 WHERE status = ? AND id = ?"
    ),
    # running (or held, likewise) -> pending, to run again at run_at.
    "retry_later": (
        "UPDATE jobs SET status = 'pending', run_at = ?, error = ?, attempts = ?,"
        " progress = COALESCE(?, progress), progress_message = COALESCE(?, progress_message),"
        " started_at = NULL, worker_pid = NULL, interruptions = 0 WHERE status = ? AND id = ?"
    ),
    # running -> pending, uncharged: the supervisor stopped it (drain, fast stop).
    "requeue": (
        "UPDATE jobs SET status = 'pending', attempts = ?, run_at = ?, started_at = NULL,"
        " worker_pid = NULL WHERE status = ? AND id = ?"
    ),
    # pending or held -> cancelled, expired: it ends without running (again).
    "cancel_pending": (
        "UPDATE jobs SET status = ?, finished_at = ?, error = ? WHERE status = ? AND id = ?"
    ),
    # failed, cancelled, expired -> pending: an operator's retry.
    "revive": (
        "UPDATE jobs SET status = 'pending', attempts = 0, interruptions = 0, run_at = ?,"
        " result = NULL, error = NULL, finished_at = NULL, started_at = NULL,"
        " abort_requested = 0, progress = NULL, progress_message = NULL WHERE status = ? AND id = ?"
    ),
    "request_abort": (
        "UPDATE jobs SET abort_requested = 1 WHERE id = ?"
    ),
    "record_progress": (
        "UPDATE jobs SET progress = ?, progress_message = ? WHERE status = 'running' AND id = ?"
    ),
    "record_attempt": (
        "INSERT INTO attempts (job_id, attempt, status, error, worker_pid,"
        " started_at, finished_at, cpu_seconds, peak_rss) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    ),
    # Retention: an ended job older than its state's cutoff, and its attempts. The
    # guard keeps a job that was retried since it was found (its status and
    # finished_at changed) from being deleted.
    "forget_ended": (
        "DELETE FROM jobs WHERE id = ? AND status = ? AND finished_at < ?"
    ),
    "forget_attempts": (
        "DELETE FROM attempts WHERE job_id = ? AND NOT EXISTS (SELECT 1 FROM jobs WHERE id = ?)"
    ),
    "save_setting": "INSERT OR REPLACE INTO settings (name, value) VALUES (?, ?)",
    "save_schedule": (
        "INSERT OR REPLACE INTO schedules (name, next_run, last_run, last_job, cron, timezone)"
        " VALUES (?, ?, ?, ?, ?, ?)"
    ),
}
