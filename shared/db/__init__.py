"""The run registry: SQLAlchemy tables, engine/session setup and the functions that record state."""
