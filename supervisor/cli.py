def main() -> int:
    raise SystemExit("agentpen: under construction")
