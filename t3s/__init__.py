"""T3S: Training-Trajectory-Aware Token Selection, end to end."""
