"""commands: batches and per-PC commands with their lifecycle

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 14:08:00.110161
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import wcms.server.db

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "command_batches",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("created_by", sa.String(length=100), nullable=False),
        sa.Column("type", sa.String(length=32), nullable=False),
        sa.Column("args", sa.JSON(), nullable=False),
        sa.Column("target", sa.String(length=255), nullable=False),
        sa.Column("created_at", wcms.server.db.UTCDateTime(), nullable=False),
        sa.Column("expires_at", wcms.server.db.UTCDateTime(), nullable=False),
        sa.Column("run_when_online", sa.Boolean(), nullable=False),
        sa.Column("pc_count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_command_batches")),
    )
    with op.batch_alter_table("command_batches", schema=None) as batch_op:
        batch_op.create_index("ix_command_batches_created_at", ["created_at"], unique=False)

    op.create_table(
        "commands",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("batch_id", sa.Integer(), nullable=False),
        sa.Column("pc_id", sa.Integer(), nullable=False),
        sa.Column("type", sa.String(length=32), nullable=False),
        sa.Column("args", sa.JSON(), nullable=False),
        sa.Column("secret", sa.Text(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("run_when_online", sa.Boolean(), nullable=False),
        sa.Column("queued_at", wcms.server.db.UTCDateTime(), nullable=False),
        sa.Column("expires_at", wcms.server.db.UTCDateTime(), nullable=False),
        sa.Column("delivered_at", wcms.server.db.UTCDateTime(), nullable=True),
        sa.Column("started_at", wcms.server.db.UTCDateTime(), nullable=True),
        sa.Column("finished_at", wcms.server.db.UTCDateTime(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("stdout", sa.Text(), nullable=True),
        sa.Column("stderr", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["batch_id"],
            ["command_batches.id"],
            name=op.f("fk_commands_batch_id_command_batches"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["pc_id"], ["pc_info.id"], name=op.f("fk_commands_pc_id_pc_info"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_commands")),
    )
    with op.batch_alter_table("commands", schema=None) as batch_op:
        batch_op.create_index("ix_commands_batch_id", ["batch_id"], unique=False)
        batch_op.create_index("ix_commands_pc_status", ["pc_id", "status"], unique=False)
        batch_op.create_index(
            "ix_commands_status_expires_at", ["status", "expires_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("commands", schema=None) as batch_op:
        batch_op.drop_index("ix_commands_status_expires_at")
        batch_op.drop_index("ix_commands_pc_status")
        batch_op.drop_index("ix_commands_batch_id")

    op.drop_table("commands")
    with op.batch_alter_table("command_batches", schema=None) as batch_op:
        batch_op.drop_index("ix_command_batches_created_at")

    op.drop_table("command_batches")
