"""Supervisor: CLI, policy resolution, session orchestration, audit stream."""
