"""Model registry: models (imported or trained), their checkpoints and their exports.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("source_job_id", sa.String(length=36), nullable=True),
        sa.Column("source_path", sa.Text(), nullable=True),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("checkpoint_tag", sa.String(length=64), nullable=True),
        sa.Column("vocab_size", sa.Integer(), nullable=True),
        sa.Column("tokenizer_path", sa.Text(), nullable=True),
        sa.Column("parent_model", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("manifest", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["source_job_id"], ["jobs.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_index("ix_models_source_job_id", "models", ["source_job_id"], unique=False)

    op.create_table(
        "model_checkpoints",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("phase", sa.String(length=8), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("has_optimizer", sa.Boolean(), nullable=False),
        sa.Column("optimizer_world_size", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("model_id", "phase", "step", name="uq_model_checkpoints_model_phase_step"),
    )
    op.create_index("ix_model_checkpoints_model_id", "model_checkpoints", ["model_id"], unique=False)

    op.create_table(
        "model_exports",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("format", sa.String(length=16), nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=True),
        sa.Column("phase", sa.String(length=8), nullable=True),
        sa.Column("step", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="SET NULL"),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("model_id", "path", name="uq_model_exports_model_path"),
    )
    op.create_index("ix_model_exports_model_id", "model_exports", ["model_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_model_exports_model_id", table_name="model_exports")
    op.drop_table("model_exports")
    op.drop_index("ix_model_checkpoints_model_id", table_name="model_checkpoints")
    op.drop_table("model_checkpoints")
    op.drop_index("ix_models_source_job_id", table_name="models")
    op.drop_table("models")
