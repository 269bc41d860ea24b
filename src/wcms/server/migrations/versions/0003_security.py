"""security: server-side sessions, shared rate limits, key owners, PC approval

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 15:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import wcms.server.db

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "admin_sessions",
        sa.Column("id_hash", sa.String(length=64), nullable=False),
        sa.Column("admin_id", sa.Integer(), nullable=False),
        sa.Column("csrf", sa.String(length=64), nullable=False),
        sa.Column("created_at", wcms.server.db.UTCDateTime(), nullable=False),
        sa.Column("last_seen_at", wcms.server.db.UTCDateTime(), nullable=False),
        sa.Column("expires_at", wcms.server.db.UTCDateTime(), nullable=False),
        sa.Column("ip", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(
            ["admin_id"],
            ["admins.id"],
            name=op.f("fk_admin_sessions_admin_id_admins"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id_hash", name=op.f("pk_admin_sessions")),
    )
    with op.batch_alter_table("admin_sessions", schema=None) as batch_op:
        batch_op.create_index("ix_admin_sessions_admin_id", ["admin_id"], unique=False)

    op.create_table(
        "rate_limits",
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("tat", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_rate_limits")),
    )

    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("owner_id", sa.Integer(), nullable=True))
        batch_op.create_foreign_key(
            batch_op.f("fk_api_keys_owner_id_admins"),
            "admins",
            ["owner_id"],
            ["id"],
            ondelete="CASCADE",
        )

    with op.batch_alter_table("pc_info", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("approved", sa.Boolean(), server_default=sa.true(), nullable=False)
        )
        batch_op.add_column(
            sa.Column("reregister_until", wcms.server.db.UTCDateTime(), nullable=True)
        )

    with op.batch_alter_table("registration_pins", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("auto_approve", sa.Boolean(), server_default=sa.false(), nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("registration_pins", schema=None) as batch_op:
        batch_op.drop_column("auto_approve")
    with op.batch_alter_table("pc_info", schema=None) as batch_op:
        batch_op.drop_column("reregister_until")
        batch_op.drop_column("approved")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_api_keys_owner_id_admins"), type_="foreignkey")
        batch_op.drop_column("owner_id")
    op.drop_table("rate_limits")
    with op.batch_alter_table("admin_sessions", schema=None) as batch_op:
        batch_op.drop_index("ix_admin_sessions_admin_id")
    op.drop_table("admin_sessions")
