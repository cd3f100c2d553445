"""waitpoints: durable waits, tokens and child-run waits (the wait journal)

Revision ID: 0006
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0004"


def upgrade() -> None:
    op.create_table(
        "waitpoints",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("environment_id", sa.String(length=40), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("run_id", sa.String(length=40), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=True),
        sa.Column("seq", sa.Integer(), nullable=True),
        sa.Column("target", sa.String(length=40), nullable=True),
        sa.Column("ok", sa.Boolean(), nullable=True),
        sa.Column("output", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("due_at", sa.BigInteger(), nullable=True),
        sa.Column("idempotency_key", sa.String(length=2048), nullable=True),
        sa.Column("idempotency_key_expires_at", sa.BigInteger(), nullable=True),
        sa.Column("tags", sa.Text(), nullable=False),
        sa.Column("secret", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("completed_at", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ux_waitpoints_run_seq", "waitpoints", ["run_id", "attempt", "seq"], unique=True
    )
    op.create_index("ix_waitpoints_target", "waitpoints", ["target"])
    op.create_index("ix_waitpoints_env_key", "waitpoints", ["environment_id", "idempotency_key"])
    op.create_table(
        "waitpoint_children",
        sa.Column("waitpoint_id", sa.String(length=40), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=40), nullable=False),
        sa.PrimaryKeyConstraint("waitpoint_id", "position"),
    )
    op.create_index("ix_waitpoint_children_run", "waitpoint_children", ["run_id"])


def downgrade() -> None:
    op.drop_index("ix_waitpoint_children_run", table_name="waitpoint_children")
    op.drop_table("waitpoint_children")
    op.drop_index("ix_waitpoints_env_key", table_name="waitpoints")
    op.drop_index("ix_waitpoints_target", table_name="waitpoints")
    op.drop_index("ux_waitpoints_run_seq", table_name="waitpoints")
    op.drop_table("waitpoints")
