"""The benchmark harness of issue 5: ``scripts/bench`` runs it (see bench/README.md)."""
