"""run engine: delays, ttl, overrides, replay, idempotency TTL, depth, debounce; queues; batches

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("delay_until", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("ttl_ms", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("max_duration_ms", sa.BigInteger(), nullable=True))
        batch_op.add_column(
            sa.Column("machine", sa.String(length=32), nullable=False, server_default="")
        )
        batch_op.add_column(sa.Column("replayed_from_run_id", sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column("idempotency_key_expires_at", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("depth", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("debounce_key", sa.String(length=512), nullable=True))
        batch_op.create_index("ix_runs_batch", ["batch_id"], unique=False)
        batch_op.create_index("ix_runs_parent", ["parent_run_id"], unique=False)
        batch_op.create_index(
            "ix_runs_debounce", ["environment_id", "task_id", "debounce_key"], unique=False
        )
    with op.batch_alter_table("task_definitions", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("ttl_ms", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch_op.add_column(
            sa.Column("payload_schema", sa.Text(), nullable=False, server_default="")
        )
    op.create_table(
        "queues",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("environment_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("concurrency_limit", sa.Integer(), nullable=False),
        sa.Column("limit_override", sa.Integer(), nullable=True),
        sa.Column("overridden_at", sa.BigInteger(), nullable=True),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ux_queues_env_name", "queues", ["environment_id", "name"], unique=True)
    op.create_table(
        "batches",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("environment_id", sa.String(length=40), nullable=False),
        sa.Column("run_count", sa.Integer(), nullable=False),
        sa.Column("idempotency_key", sa.String(length=2048), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_batches_env_idempotency", "batches", ["environment_id", "idempotency_key"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_batches_env_idempotency", table_name="batches")
    op.drop_table("batches")
    op.drop_index("ux_queues_env_name", table_name="queues")
    op.drop_table("queues")
    with op.batch_alter_table("task_definitions", schema=None) as batch_op:
        batch_op.drop_column("payload_schema")
        batch_op.drop_column("ttl_ms")
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_index("ix_runs_debounce")
        batch_op.drop_index("ix_runs_parent")
        batch_op.drop_index("ix_runs_batch")
        for column in (
            "debounce_key",
            "depth",
            "idempotency_key_expires_at",
            "replayed_from_run_id",
            "machine",
            "max_duration_ms",
            "ttl_ms",
            "delay_until",
        ):
            batch_op.drop_column(column)
