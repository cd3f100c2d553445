"""scheduler replicas: the lease one replica holds to lead, with its fencing token

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"


def upgrade() -> None:
    op.create_table(
        "scheduler_leases",
        sa.Column("name", sa.String(length=64), primary_key=True),
        sa.Column("holder", sa.String(length=128), nullable=False),
        sa.Column("token", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("grpc_address", sa.String(length=256), nullable=False),
        sa.Column("http_address", sa.String(length=256), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("scheduler_leases")
