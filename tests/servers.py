"""Where the tests find the machine's real PostgreSQL and Redis.

One definition, so a developer (or a second checkout running its suite at the same time) can point
the tests at another Redis with `NCP_TEST_REDIS_PORT`: the platform tests flush their Redis
database, and two suites sharing one would consume each other's Celery messages.
"""

from __future__ import annotations

import os

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
REDIS_PORT = int(os.environ.get("NCP_TEST_REDIS_PORT", "6379"))


def pg_url(name: str) -> str:
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def redis_url(db: int) -> str:
    return f"redis://127.0.0.1:{REDIS_PORT}/{db}"
