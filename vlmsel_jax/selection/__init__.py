"""Selection policies (AC law and policy, Mordal, DCD, GW ranking) and judging their rankings."""
