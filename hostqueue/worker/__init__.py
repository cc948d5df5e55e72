"""The worker process (main.py), started as ``python -m hostqueue.worker``."""
