"""worker versions: runs locked to a version, each version's manifest, current definitions

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        # Runs made before versions keep '': any executor of their task may run them.
        batch.add_column(
            sa.Column("worker_version", sa.String(length=64), nullable=False, server_default="")
        )
        batch.add_column(sa.Column("parked_from", sa.String(length=16), nullable=True))
        batch.create_index("ix_runs_worker_version", ["environment_id", "worker_version", "status"])
    with op.batch_alter_table("task_definitions") as batch:
        batch.add_column(
            sa.Column("version", sa.String(length=64), nullable=False, server_default="")
        )
    op.create_table(
        "worker_versions",
        sa.Column("environment_id", sa.String(length=40), primary_key=True),
        sa.Column("version", sa.String(length=64), primary_key=True),
        sa.Column("manifest", sa.Text(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("promoted_at", sa.BigInteger(), nullable=True),
        sa.Column("rolled_back", sa.Boolean(), nullable=False, server_default=sa.false()),
    )


def downgrade() -> None:
    op.drop_table("worker_versions")
    with op.batch_alter_table("task_definitions") as batch:
        batch.drop_column("version")
    with op.batch_alter_table("runs") as batch:
        batch.drop_index("ix_runs_worker_version")
        batch.drop_column("parked_from")
        batch.drop_column("worker_version")
