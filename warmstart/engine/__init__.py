"""The method, with no Lightning import: task vectors, activation statistics, Procrustes maps,
family adapters, matching, per-parameter rules and the transactional transport."""
