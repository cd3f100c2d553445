"""api keys: rights (api, execute), a name, revocation

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        # Comma-separated rights: "api" (trigger, read, manage) and "execute" (WorkerService).
        # Keys made before rights existed keep only "api": an executor needs a worker key now.
        batch.add_column(
            sa.Column("rights", sa.String(length=64), nullable=False, server_default="api")
        )
        batch.add_column(
            sa.Column("name", sa.String(length=128), nullable=False, server_default="")
        )
        batch.add_column(sa.Column("revoked_at", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("revoked_at")
        batch.drop_column("name")
        batch.drop_column("rights")
