"""one run per schedule tick: runs.schedule_tick, unique

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("schedule_tick", sa.String(length=80), nullable=True))
    op.create_index(
        "ux_runs_schedule_tick",
        "runs",
        ["schedule_tick"],
        unique=True,
        sqlite_where=sa.text("schedule_tick IS NOT NULL"),
        postgresql_where=sa.text("schedule_tick IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ux_runs_schedule_tick", table_name="runs")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("schedule_tick")
