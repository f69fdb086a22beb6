"""Evaluation: bits per byte (bpb.py), CORE (core.py), chat tasks (chat.py), reports (report.py)."""
