"""Quality–latency Pareto fronts per model and device, and ``"strategy": "auto"`` under a latency budget."""
