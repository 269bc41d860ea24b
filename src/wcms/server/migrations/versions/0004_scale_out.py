"""scale-out: history samples unique per PC and slot, list hashes, wrong tries per live PIN

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 04:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The sample interval a history sample falls in (its time // the interval). Rows from
    # before have none; NULLs never clash in a unique index, so they stay as they are.
    with op.batch_alter_table("metric_samples", schema=None) as batch_op:
        batch_op.add_column(sa.Column("slot", sa.BigInteger(), nullable=True))
        batch_op.create_index("ux_metric_samples_pc_slot", ["pc_id", "slot"], unique=True)
    # What the stored lists hash to, so any process compares a heartbeat's lists with the
    # database's, not with what it last wrote itself.
    with op.batch_alter_table("pc_metrics", schema=None) as batch_op:
        batch_op.add_column(sa.Column("disks_hash", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("processes_hash", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("registration_pins", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("wrong_tries", sa.Integer(), server_default="0", nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("registration_pins", schema=None) as batch_op:
        batch_op.drop_column("wrong_tries")
    with op.batch_alter_table("pc_metrics", schema=None) as batch_op:
        batch_op.drop_column("processes_hash")
        batch_op.drop_column("disks_hash")
    with op.batch_alter_table("metric_samples", schema=None) as batch_op:
        batch_op.drop_index("ux_metric_samples_pc_slot")
        batch_op.drop_column("slot")
