"""The dataset builder: Kafka feedback topics -> immutable, cumulative dataset
snapshots with InstructGPT's data rules applied (builder.py, rules.py), and a
CLI to build and inspect them (`python -m services.datasets`)."""
